"""Writes fastai_xresnet.npz: fastai 2.8's XResNet facts, for test_fastai_xresnet.py.

- xresnet18(n_out=10): its state_dict's keys, shapes and dtypes, and for every entry the
  mean, std, min and max fastai's `init_cnn` gives it (torch seed 0);
- xresnet34/50/101/152 (n_out=1000): keys and shapes (built on torch's meta device);
- xresnet18 with weights from parity_tests/xresnet_weights.py (numpy, rebuilt by the test)
  on a batch of two odd-sized 33x47 images: eval-mode logits, then training-mode logits and
  every BatchNorm's running statistics after that training forward.

Needs fastai (the scratch venv; the tests read only the .npz). From the repository root:
  PYTHONPATH=. $PY parity_tests/golden/make_fastai_xresnet.py
"""
import json
from pathlib import Path

import numpy as np
import torch
from fastai.vision.models import xresnet

from parity_tests.xresnet_weights import state_dict


def layout(model: torch.nn.Module) -> dict[str, tuple[list[int], str]]:
  return {k: (list(v.shape), str(v.dtype).removeprefix('torch.')) for k, v in model.state_dict().items()}


def main():
  torch.manual_seed(0)
  model = xresnet.xresnet18(n_out=10)
  shapes = layout(model)
  out = {'xresnet18/layout': json.dumps(shapes)}
  for key, value in model.state_dict().items():
    v = value.double()
    out[f'xresnet18/init/{key}'] = np.array([v.mean(), v.std() if v.numel() > 1 else 0.0, v.min(), v.max()])
  for name in ('xresnet34', 'xresnet50', 'xresnet101', 'xresnet152'):
    with torch.device('meta'):
      out[f'{name}/layout'] = json.dumps(layout(getattr(xresnet, name)()))

  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict(shapes).items()}, strict=True)
  images = np.random.default_rng(0).standard_normal((2, 3, 33, 47)).astype(np.float32)
  model.eval()
  with torch.no_grad():
    out['eval_logits'] = model(torch.from_numpy(images)).numpy()
    model.train()
    out['train_logits'] = model(torch.from_numpy(images)).numpy()
  out |= {f'after_train/{k}': v.numpy().copy() for k, v in model.state_dict().items()
          if k.rsplit('.', 1)[-1] in ('running_mean', 'running_var', 'num_batches_tracked')}
  out['images_nchw'] = images
  path = Path(__file__).with_name('fastai_xresnet.npz')
  np.savez_compressed(path, **out)
  print(f'wrote {path}: {len(shapes)} xresnet18 entries; logits eval {np.abs(out["eval_logits"]).max():.3f}, '
        f'train {np.abs(out["train_logits"]).max():.3f} (largest)')


if __name__ == '__main__':
  main()
