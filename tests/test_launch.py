"""launch/ scripts: syntax, --dry-run command lines, clear errors for missing settings."""
import glob
import os
import stat
import subprocess

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
