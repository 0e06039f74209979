"""Training configs: `get_config(preset)` files for `bmojo-train --config configs/<file>.py[:<preset>]`."""
