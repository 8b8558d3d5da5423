"""``python -m hubcompile <command>`` (or ``hubcompile <command>``): ``demo`` compiles a
small model and reports accuracy; ``diff`` shows what was replaced in any model."""

import sys

COMMANDS = ("demo", "diff")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        given = repr(argv[0]) if argv else "no command"
        print(f"usage: hubcompile {{{','.join(COMMANDS)}}} [options]; got {given}", file=sys.stderr)
        return 2
    if argv[0] == "diff":
        from .explain import main as diff

        return diff(argv[1:])
    from . import demo

    return demo.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
