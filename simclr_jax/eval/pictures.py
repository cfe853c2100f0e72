"""Pictures of a run: a t-SNE map of the features and the training curves.

matplotlib with the Agg backend (no display needed); figures are written at a fixed pixel size
(`PANEL_PX` per panel) so they read the same everywhere.
"""
from typing import Any, Mapping, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top
from sklearn.decomposition import PCA  # noqa: E402  pylint: disable=g-import-not-at-top
from sklearn.manifold import TSNE  # noqa: E402  pylint: disable=g-import-not-at-top
from threadpoolctl import threadpool_limits  # noqa: E402  pylint: disable=g-import-not-at-top

DPI = 100
PANEL_PX = (640, 560)  # width, height of one panel in pixels
MAX_POINTS = 2000  # enough to show the clusters; t-SNE of 1000 points takes ~15 s on one core
_PCA_DIMS = 50  # the usual reduction before t-SNE: faster, and drops the noisiest directions

# metrics.jsonl keys of the accuracy panel, in legend order, with their legend text.
ACCURACY_KEYS = {
    'contrastive_acc': 'contrastive accuracy (train batch)',
    'probe_acc': 'online probe (train batch)',
    'eval/probe_top1': 'online probe top-1 (eval split)',
    'eval/knn_top1': 'kNN top-1 (eval split)',
}


def _figure(panels: int) -> tuple[Any, list[Any]]:
  """A figure of `panels` side-by-side axes, PANEL_PX each."""
  w, h = PANEL_PX
  fig, axes = plt.subplots(1, panels, figsize=(w * panels / DPI, h / DPI), dpi=DPI,
                           squeeze=False)
  return fig, list(axes[0])


def _save(fig: Any, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)  # not bbox_inches='tight': the pixel size stays PANEL_PX-exact
  plt.close(fig)


def tsne_2d(feats: np.ndarray, seed: int = 0) -> np.ndarray:
  """[N, 2] t-SNE of L2-normalised features (cosine geometry, as kNN and the loss use)."""
  x = np.asarray(feats, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  if x.shape[1] > _PCA_DIMS and len(x) > _PCA_DIMS:
    x = PCA(_PCA_DIMS, random_state=seed).fit_transform(x)
  perplexity = float(min(30.0, max((len(x) - 1) / 3, 1.0)))
  # One OpenMP thread: t-SNE's threads spin at every barrier, so on a busy host (the test
  # suite's workers, a training job beside it) two threads ran 15x slower than one.
  with threadpool_limits(1, user_api='openmp'):
    return TSNE(2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(x)


def _scatter(ax: Any, xy: np.ndarray, labels: np.ndarray, names: Sequence[str], title: str
             ) -> None:
  cmap = plt.get_cmap('tab10' if len(names) <= 10 else 'tab20')
  for c, name in enumerate(names):
    sel = labels == c
    if sel.any():
      ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cmap(c % cmap.N), label=name, alpha=0.8,
                 linewidths=0)
  ax.set_title(title)
  ax.set_xlabel('t-SNE 1')
  ax.set_ylabel('t-SNE 2')
  ax.set_xticks([])
  ax.set_yticks([])
  if len(names) <= 20:  # beyond that a legend hides the map
    ax.legend(title='class', fontsize='small', markerscale=2, loc='best', framealpha=0.8)


def embedding_map(path: str, feats: np.ndarray, labels: np.ndarray,
                  class_names: Sequence[str] | None = None, baseline: np.ndarray | None = None,
                  max_points: int = MAX_POINTS, seed: int = 0) -> None:
  """PNG of a t-SNE map of `feats` coloured by class, beside the same for `baseline` if given.

  `baseline` holds another encoder's features of the same examples (e.g. the random encoder's),
  row for row. At most `max_points` examples are drawn, a seeded random subset.
  """
  feats, labels = np.asarray(feats), np.asarray(labels).astype(np.int64)
  if feats.ndim != 2 or labels.shape != feats.shape[:1]:
    raise ValueError(f'feats {feats.shape} and labels {labels.shape} do not match.')
  if baseline is not None and np.shape(baseline)[0] != len(feats):
    raise ValueError(f'baseline has {np.shape(baseline)[0]} rows, feats {len(feats)}.')
  rows = np.arange(len(feats))
  if len(rows) > max_points:
    rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
  num_classes = int(labels.max()) + 1 if len(labels) else 0
  names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
  maps = [('pretrained encoder', feats)]
  if baseline is not None:
    maps.append(('random encoder (baseline)', np.asarray(baseline)))
  fig, axes = _figure(len(maps))
  for ax, (title, x) in zip(axes, maps):
    _scatter(ax, tsne_2d(x[rows], seed), labels[rows], names,
             f'{title}: t-SNE of {len(rows)} examples')
  _save(fig, path)


def _marker(steps: np.ndarray) -> str | None:
  """Dots on sparse series (periodic evaluations, short runs): a lone point has no line."""
  return 'o' if len(steps) <= 30 else None


def training_curves(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """PNG of the pretraining loss and the accuracies in metrics.jsonl rows against step.

  Plots whichever of 'loss', ACCURACY_KEYS and other 'eval/*top*' keys the rows hold
  (evaluation figures may sit in rows of their own); a panel with nothing to plot is left out.
  """
  def series(key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r['step'], r[key]) for r in rows if 'step' in r and r.get(key) is not None]
    pts.sort()
    return np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts], np.float64)

  loss = series('loss')
  # Other evaluation accuracies (e.g. 'eval/knn_top5') are plotted too, under their own key.
  extra = sorted({k for r in rows for k in r if k.startswith('eval/') and 'top' in k}
                 - set(ACCURACY_KEYS))
  labels = {**ACCURACY_KEYS, **{k: k for k in extra}}
  accs = {k: series(k) for k in labels}
  accs = {k: v for k, v in accs.items() if len(v[0])}
  panels = (['loss'] if len(loss[0]) else []) + (['accuracy'] if accs else [])
  if not panels:
    raise ValueError(f'no loss or accuracy ({sorted(ACCURACY_KEYS)}) in the metrics rows.')
  fig, axes = _figure(len(panels))
  for ax, panel in zip(axes, panels):
    if panel == 'loss':
      ax.plot(*loss, marker=_marker(loss[0]), markersize=4, color='tab:blue',
              label='NT-Xent loss (train batch)')
      ax.set_ylabel('loss')
      ax.set_title('pretraining loss')
    else:
      for i, (key, (steps, values)) in enumerate(accs.items()):
        ax.plot(steps, values, marker=_marker(steps), markersize=4,
                color=plt.get_cmap('tab10')(i + 1), label=labels[key])
      ax.set_ylim(0.0, 1.0)
      ax.set_ylabel('accuracy')
      ax.set_title('accuracies')
    ax.set_xlabel('step')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small', loc='best')
  _save(fig, path)
