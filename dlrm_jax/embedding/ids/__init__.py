"""Host-side id state: raw ids to table rows beyond a fixed hash.

  managed_collision  ManagedCollisionRemapper: TorchRec's managed-collision
                     module (LRU/LFU eviction) for unbounded id spaces
  remapping          BatchRemapper: a model's remappers over a batch
  admission          rare-id admission (a count-min sketch)
  host_state         HostState: a run's remappers and admission, saved with
                     every checkpoint and carried into the export
"""
