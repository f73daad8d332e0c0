"""``python -m benchmarks <what> [options]``; ``what`` is one of: memory, resources."""
import sys


def main():
    commands = {"memory": "benchmarks.memory", "resources": "benchmarks.resources"}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__.strip())
        return 2
    import importlib
    module = importlib.import_module(commands[sys.argv[1]])
    module.main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
