"""`python -m simclr_jax.bench <step|input|loss|end_to_end> [flags]`: runs one benchmark sub-command."""
import importlib
import sys

SUBCOMMANDS = ('step', 'input', 'loss', 'end_to_end')


def main(argv: list[str]) -> None:
  if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
    sys.exit(f'usage: python -m simclr_jax.bench {{{"|".join(SUBCOMMANDS)}}} [--flags]')
  module = importlib.import_module(f'simclr_jax.bench.{argv[1]}')
  module.main([argv[0]] + argv[2:])


if __name__ == '__main__':
  main(sys.argv)
