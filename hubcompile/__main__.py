"""``python -m hubcompile <command>``: ``demo`` compiles a small model and reports."""

import sys

COMMANDS = ("demo",)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        given = repr(argv[0]) if argv else "no command"
        print(f"usage: python -m hubcompile {{{','.join(COMMANDS)}}} [options]; got {given}", file=sys.stderr)
        return 2
    from . import demo

    return demo.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
