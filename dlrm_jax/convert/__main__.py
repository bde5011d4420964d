r"""Converts DLRM weights between dlrm_jax and facebookresearch/dlrm or TorchRec.

Import a peer's state dict as a step-0 dlrm_jax checkpoint with its config:

  python -m dlrm_jax.convert --peer=facebook --input=model.pt \
      --workdir=runs/imported
  python -m dlrm_jax.convert --peer=torchrec --input=sd.pt \
      --workdir=runs/dcn --table_features='t_a=f1,f2;t_b=f3'

Export a run's checkpoint as the peer's state dict:

  python -m dlrm_jax.convert --peer=torchrec --direction=export \
      --workdir=runs/a --output=state_dict.pt

Files are `.npz`, or `.pt`/`.pth` with torch installed. What the other side
cannot represent is refused in one line, before anything is written. The
peers' layouts are described in `dlrm_jax.convert.peers`, the mapping to
dlrm_jax in `dlrm_jax.convert.weights`.
"""

from dlrm_jax.convert import command

if __name__ == '__main__':
  command.main()
