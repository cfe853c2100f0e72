"""launch/ scripts: syntax, --dry-run command lines, clear errors for missing settings."""
import glob
import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, 'launch', '*.sh')) +
                 glob.glob(os.path.join(ROOT, 'launch', '*.sbatch')))
# Settings a user's shell may hold must not leak into the expectations.
_CLEAN = ('PROJECT', 'ZONE', 'BUCKET', 'TPU_NAME', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION', 'CONFIG',
          'RUN_NAME', 'WORKDIR', 'TFDS_DATA_DIR', 'SPOT', 'QUEUED', 'WORKER', 'DRY_RUN', 'NODES',
          'GPUS_PER_NODE', 'PER', 'PARTITION', 'ACCOUNT', 'TIME', 'PORT', 'PYTHON', 'REPO')


def _run(script, *args, env=None):
  base = {k: v for k, v in os.environ.items() if k not in _CLEAN and not k.startswith('SLURM_')}
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', script), *args], cwd=ROOT,
                        env=dict(base, **(env or {})), capture_output=True, text=True, timeout=60)
  return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize('path', SCRIPTS, ids=os.path.basename)
def test_bash_syntax_and_executable(path):
  assert subprocess.run(['bash', '-n', path], capture_output=True).returncode == 0
  assert os.stat(path).st_mode & stat.S_IXUSR, f'{path} is not executable'


def test_expected_scripts_exist():
  names = {os.path.basename(p) for p in SCRIPTS}
  assert {'tpu_vm.sh', 'slurm.sbatch', 'slurm_submit.sh'} <= names


LOC = '--zone=us-central2-b --project=my-proj'


@pytest.mark.parametrize('args,expected', [
    (['create', '--spot'],
     f'+ gcloud compute tpus tpu-vm create simclr-tpu {LOC} --accelerator-type=v4-32 '
     '--version=tpu-ubuntu2204-base --spot'),
    (['create', '--queued', '--name=q1', '--accelerator-type=v5p-64'],
     f'+ gcloud compute tpus queued-resources create q1 --node-id=q1 {LOC} '
     '--accelerator-type=v5p-64 --runtime-version=tpu-ubuntu2204-base'),
    (['setup'],
     f'+ gcloud compute tpus tpu-vm scp /tmp/simclr_jax.tgz simclr-tpu:simclr_jax.tgz '
     f'--worker=all {LOC}'),
    (['setup'], f"+ gcloud compute tpus tpu-vm ssh simclr-tpu {LOC} --worker=all '--command="),
    (['run', '--bucket=gs://my-bucket/', '--', '--config.train.epochs=1000'],
     f"+ gcloud compute tpus tpu-vm ssh simclr-tpu {LOC} --worker=all '--command=cd ~/simclr_jax "
     '&& TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets nohup .venv/bin/python -m '
     'simclr_jax.main --config=configs/imagenet.py --workdir=gs://my-bucket/simclr_jax/simclr_r50 '
     "--config.train.epochs=1000 > ~/simclr_jax.log 2>&1 < /dev/null &'"),
    (['logs', '--worker=3'],
     f"+ gcloud compute tpus tpu-vm ssh simclr-tpu {LOC} --worker=3 "
     "'--command=tail -n 200 -F ~/simclr_jax.log'"),
    (['delete'], f'+ gcloud compute tpus tpu-vm delete simclr-tpu {LOC} --quiet'),
    (['delete', '--queued'],
     f'+ gcloud compute tpus queued-resources delete simclr-tpu {LOC} --force --quiet'),
])
def test_tpu_vm_dry_run(args, expected):
  code, out, err = _run('tpu_vm.sh', args[0], '--project=my-proj', '--zone=us-central2-b',
                        '--dry-run', *args[1:], env={'TMPDIR': '/tmp'})
  assert code == 0, err
  assert expected in out, out


def test_tpu_vm_settings_from_env():
  code, out, err = _run('tpu_vm.sh', 'run', env={
      'PROJECT': 'p', 'ZONE': 'z', 'BUCKET': 'b', 'TPU_NAME': 'n', 'DRY_RUN': '1',
      'CONFIG': 'configs/cifar10.py', 'WORKDIR': 'gs://b/x'})
  assert code == 0, err
  assert ('gcloud compute tpus tpu-vm ssh n --zone=z --project=p --worker=all' in out and
          '--config=configs/cifar10.py --workdir=gs://b/x' in out), out


@pytest.mark.parametrize('args,env,message', [
    (['create'], {'ZONE': 'z'}, 'no GCP project'),
    (['create'], {'PROJECT': 'p'}, 'no zone'),
    (['run'], {'PROJECT': 'p', 'ZONE': 'z'}, 'no bucket'),
    (['launch'], {'PROJECT': 'p', 'ZONE': 'z'}, "unknown sub-command 'launch'"),
    (['run', '--buckt=b'], {'PROJECT': 'p', 'ZONE': 'z'}, "unknown flag '--buckt=b'"),
])
def test_tpu_vm_missing_settings_stop_with_a_message(args, env, message):
  code, out, err = _run('tpu_vm.sh', *args, '--dry-run', env=env)
  assert code != 0 and message in err and 'gcloud' not in out, (out, err)


def test_slurm_submit_dry_run_one_process_per_gpu():
  code, out, err = _run('slurm_submit.sh', '--workdir=/shared/r50', '--partition=gpu',
                        '--tfds-data-dir=/shared/tfds', '--dry-run', '--',
                        '--config.train.epochs=1000')
  assert code == 0, err
  assert ('+ WORKDIR=/shared/r50 CONFIG=configs/imagenet.py PER=gpu TFDS_DATA_DIR=/shared/tfds '
          'sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --time=48:00:00 '
          '--partition=gpu launch/slurm.sbatch -- --config.train.epochs=1000') in out, out
  assert (f'TFDS_DATA_DIR=/shared/tfds srun --kill-on-bad-exit=1 {ROOT}/.venv/bin/python -m '
          'simclr_jax.main --config=configs/imagenet.py --workdir=/shared/r50 '
          '--config.train.epochs=1000') in out, out


def test_slurm_dry_run_one_process_per_node():
  code, out, err = _run('slurm_submit.sh', '--workdir=/w', '--per=node', '--nodes=4',
                        '--gpus-per-node=4', '--dry-run')
  assert code == 0, err
  assert 'sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=4' in out, out
  assert ('srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c \'unset SLURM_LOCALID; exec '
          '"$0" "$@" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"\'') in out, out
  assert '--workdir=/w --coordinator_address=localhost:12355' in out, out


def test_slurm_sbatch_dry_run_reads_env():
  code, out, err = _run('slurm.sbatch', '--dry-run', env={
      'WORKDIR': '/w', 'CONFIG': 'configs/cifar10.py', 'PYTHON': '/opt/py'})
  assert code == 0, err
  assert '+ cd ' in out and 'srun --kill-on-bad-exit=1 /opt/py -m simclr_jax.main ' \
      '--config=configs/cifar10.py --workdir=/w' in out, out


@pytest.mark.parametrize('script,args,message', [
    ('slurm_submit.sh', ['--dry-run'], 'no workdir'),
    ('slurm_submit.sh', ['--workdir=/w', '--per=core', '--dry-run'], "must be 'gpu' or 'node'"),
    ('slurm.sbatch', ['--dry-run'], 'WORKDIR is not set'),
])
def test_slurm_missing_settings_stop_with_a_message(script, args, message):
  code, out, err = _run(script, *args)
  assert code != 0 and message in err and 'srun' not in out, (out, err)


# --- compile check (python -m simclr_jax.bench compile_check) ------------------------------
TINY_MODEL = ['--config=configs/demo.py', '--config.model.width=0.0625',
              '--config.data.image_size=8', '--config.train.batch_size=32']


def _compile_check(tmp_path, topology):
  out = tmp_path / 'figures.json'
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  env.pop('XLA_FLAGS', None)  # the CLI sets the CPU device count itself
  env.pop('JAX_PLATFORMS', None)
  proc = subprocess.run([sys.executable, '-m', 'simclr_jax.bench', 'compile_check', *TINY_MODEL,
                         f'--topology={topology}', f'--out={out}'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  return proc, out


@pytest.mark.parametrize('name,expected', [
    ('cpu:8', ('cpu', 8, None)), ('cpu', ('cpu', 0, None)),
    ('v4-32', ('v4', '2x2x4', 32 * 2**30)), ('v4-8', ('v4', '2x2x1', 32 * 2**30)),
    ('v5p-128', ('v5p', '4x4x4', 95 * 2**30)), ('v5litepod-16', ('v5e', '4x4', 16 * 2**30)),
    ('v6e-256', ('v6e', '16x16', 32 * 2**30)), ('v4:2x2x4', ('v4', '2x2x4', 32 * 2**30)),
])
def test_compile_check_topology_names(name, expected):
  from simclr_jax.bench import compile_check  # pylint: disable=g-import-not-at-top
  assert compile_check.parse_topology(name) == expected


@pytest.mark.parametrize('name', ['v4-12', 'v3-8', 'gpu:8'])
def test_compile_check_unknown_topology_is_an_error(name):
  from simclr_jax.bench import compile_check  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='--topology'):
    compile_check.parse_topology(name)


def _check_figures(out, devices, kind):
  figures = json.load(open(out))
  assert figures['devices'] == devices and figures['device_kind'] == kind
  assert figures['global_batch'] == 32 and figures['per_device_batch'] == 32 // devices
  mem = figures['memory_per_device_bytes']
  assert mem['argument'] >= 4 * figures['params'] > 0  # float32 parameters, at least
  assert mem['total'] >= mem['argument'] and mem['temp'] > 0
  # The step's FLOPs are the device's times the device count: one float rounding, approx's 1e-6.
  assert figures['flops_per_step'] == pytest.approx(figures['flops_per_device'] * devices)
  assert figures['flops_per_device'] > 0
  return figures


def test_compile_check_cpu(tmp_path):
  proc, out = _compile_check(tmp_path, 'cpu:8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'memory per device: arguments' in proc.stdout and 'FLOPs per step' in proc.stdout
  _check_figures(out, 8, 'cpu')


def test_compile_check_tpu_v4_8(tmp_path):
  if importlib.util.find_spec('libtpu') is None:
    proc, out = _compile_check(tmp_path, 'v4-8')
    assert proc.returncode != 0 and 'skipped: --topology=v4-8 needs libtpu' in proc.stderr
    assert not out.exists()
    pytest.skip("libtpu is not installed (684 MB wheel; pip install 'jax[tpu]'): the TPU "
                'compile check cannot run here; it stops with a clear message instead')
  proc, out = _compile_check(tmp_path, 'v4-8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  figures = _check_figures(out, 4, 'TPU v4')
  assert figures['hbm_per_device_bytes'] == 32 * 2**30
  assert 'of 32.00 GiB HBM' in proc.stdout
