"""Weights in and out: facebookresearch/dlrm and TorchRec DLRM state dicts.

`python -m dlrm_jax.convert` turns a peer's file into a dlrm_jax checkpoint
with a matching config, and a checkpoint back into the peer's file. A peer's
file is `.npz`, or a torch `.pt`/`.pth` with torch installed. What it cannot
represent it refuses in one line, before writing anything. It never writes a
file that loads into a different model: keys it would drop, widths no DLRM
gives, dcn or shared tables for facebookresearch, and so on.

  files    state dict files: load_state_dict (torch files read with
           weights_only), save_state_dict, save_peer_file,
           facebook_checkpoint (the dict --load-model reads), EXTENSIONS
  peers    the peers' layouts, numpy only: PeerDLRM, PeerTable, read_peer,
           state_dict_of, parse_table_features, peer_layout,
           over_arch_columns, over_arch_permutation, crossnet_columns,
           PEERS
  weights  to and from a dlrm_jax model: config_from_peer,
           params_from_peer, state_from_peer, peer_from_state,
           check_exportable, peer_tables, torchrec_arguments,
           facebook_flags
  command  the checkpoints on disk and the command line: import_checkpoint,
           save_initial_checkpoint, export_checkpoint, Export, run_import,
           run_export, main

Every public name of the four modules is re-exported here:
`from dlrm_jax import convert; convert.read_peer(...)`.
"""

# pylint: disable=g-importing-member,useless-import-alias
from dlrm_jax.convert.files import (
    EXTENSIONS as EXTENSIONS,
    FACEBOOK_DEFAULT_LR as FACEBOOK_DEFAULT_LR,
    check_input as check_input,
    check_output as check_output,
    facebook_checkpoint as facebook_checkpoint,
    load_state_dict as load_state_dict,
    save_peer_file as save_peer_file,
    save_state_dict as save_state_dict,
)
# The tests ask it whether torch is installed.
from dlrm_jax.convert.files import _torch as _torch
from dlrm_jax.convert.peers import (
    MAX_DENSE as MAX_DENSE,
    MAX_SPARSE as MAX_SPARSE,
    PEER_NAMES as PEER_NAMES,
    PEERS as PEERS,
    PeerDLRM as PeerDLRM,
    PeerTable as PeerTable,
    crossnet_columns as crossnet_columns,
    over_arch_columns as over_arch_columns,
    over_arch_permutation as over_arch_permutation,
    parse_table_features as parse_table_features,
    peer_layout as peer_layout,
    read_peer as read_peer,
    state_dict_of as state_dict_of,
)
from dlrm_jax.convert.weights import (
    check_exportable as check_exportable,
    config_from_peer as config_from_peer,
    facebook_flags as facebook_flags,
    params_from_peer as params_from_peer,
    peer_from_state as peer_from_state,
    peer_tables as peer_tables,
    state_from_peer as state_from_peer,
    torchrec_arguments as torchrec_arguments,
)
from dlrm_jax.convert.command import (
    PEER_FILE as PEER_FILE,
    TORCHREC_SIDECAR as TORCHREC_SIDECAR,
    Export as Export,
    check_new_workdir as check_new_workdir,
    config_of_workdir as config_of_workdir,
    default_base_config as default_base_config,
    export_checkpoint as export_checkpoint,
    import_checkpoint as import_checkpoint,
    main as main,
    run_export as run_export,
    run_import as run_import,
    save_initial_checkpoint as save_initial_checkpoint,
    sidecar_path as sidecar_path,
)
