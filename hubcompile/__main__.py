"""``python -m hubcompile <command>`` (or ``hubcompile <command>``): ``demo`` compiles a
small model and reports accuracy; ``diff`` shows what was replaced in any model."""

import sys

COMMANDS = {
    "demo": "compile a small Llama with backend='hubkernels'; print what was replaced and its accuracy",
    "diff": "show what was replaced in a model, and why a match was kept (text, JSON or HTML)",
}
USAGE = "usage: hubcompile {" + ",".join(COMMANDS) + "} [options]"


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:{width}}  {what}" for name, what in COMMANDS.items()]
    lines += ["", "'hubcompile <command> --help' lists a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = repr(argv[0]) if argv else "no command"
        print(f"{USAGE}; got {given}\n(hubcompile --help lists the commands)", file=sys.stderr)
        return 2
    if argv[0] == "diff":
        from .explain import main as diff

        return diff(argv[1:])
    from . import demo

    return demo.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
