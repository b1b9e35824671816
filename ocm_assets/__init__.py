"""ocm's Dagster code location: assets, checks, sensors and jobs. ``ocm_assets.definitions.defs`` is the
entry."""
