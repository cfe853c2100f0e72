"""`python -m simclr_jax.bench <step|convs|input|loss|end_to_end|compile_check|vs_tf> [flags]`:
one sub-command."""
import importlib
import sys

SUBCOMMANDS = ('step', 'convs', 'input', 'loss', 'end_to_end', 'compile_check', 'vs_tf')


# Recipe of a sub-command run without --config (the step flag's own default is cifar10).
DEFAULT_CONFIGS = {'end_to_end': 'configs/demo.py'}


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
    sys.exit(f'usage: python -m simclr_jax.bench {{{"|".join(SUBCOMMANDS)}}} [--flags]')
  args = argv[2:]
  if argv[1] in DEFAULT_CONFIGS and not any(a == '--config' or a.startswith('--config=')
                                            for a in args):
    args = [f'--config={DEFAULT_CONFIGS[argv[1]]}'] + args
  # Before the import: ml_collections' config flag reads sys.argv when it is defined, to load
  # the right file and register its `--config.key=value` overrides once.
  sys.argv = [argv[0]] + args
  module = importlib.import_module(f'simclr_jax.bench.{argv[1]}')
  module.main(sys.argv)


if __name__ == '__main__':
  main(sys.argv)
