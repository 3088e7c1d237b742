"""The `cynorm` command: `cynorm bench` (the benchmark table), `cynorm tutorial` (the Keras tutorial models)
and `cynorm info` (which kernel build, how many threads and how much cache this machine uses)."""
import argparse
import platform
import sys


def _info(argv):
    """Print the kernel build, thread count and last-level cache size in use."""
    argparse.ArgumentParser(prog="cynorm info", description=_info.__doc__).parse_args(argv)
    import cynorm
    from cynorm import _api, _kernels

    print(f"cynorm {cynorm.__version__} on {platform.machine()}, Python {platform.python_version()}")
    print(f"kernel build: {_kernels.BUILD} (available: {', '.join(_kernels.available_builds())})")
    print(f"OpenMP: {'yes' if cynorm.HAVE_OPENMP else 'no (serial build)'}, threads: {cynorm.get_num_threads()}")
    mib = 2 ** 20
    print(f"last-level cache counted on: {_api._LAST_LEVEL_CACHE_BYTES / mib:g} MiB (outputs streamed from "
          f"{_api._FORWARD_STREAM_FROM_BYTES / mib:g} MiB in forwards, "
          f"{_api._COLUMNS_FORWARD_STREAM_FROM_BYTES / mib:g} MiB in channels-last ones, "
          f"{_api._BACKWARD_STREAM_FROM_BYTES / mib:.3g} MiB in backwards)")


def _bench(argv):
    from cynorm.benchmarks import main
    return main(argv)


def _tutorial(argv):
    from cynorm.adapters.keras_tutorial import main
    return main(argv)


COMMANDS = {"bench": _bench, "tutorial": _tutorial, "info": _info}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: cynorm {{{names}}} [options]   (cynorm COMMAND --help for a command's options)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
