"""How embedding tables are spread over the devices of the mesh.

  planner   Plan, TablePlacement, auto_plan: a strategy and devices for each
            table (replicated, table_wise, row_wise, column_wise,
            table_row_wise), how row-split ids travel (bucketized or to
            every holder, by bytes); the physical layout (stacks of pieces)
  routing   where each feature's ids go (pieces, row offsets)
  exchange  the lookups and sparse-gradient exchanges under shard_map
  relayout  moving a checkpoint's tables from one plan to another
"""
