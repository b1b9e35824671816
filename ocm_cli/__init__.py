"""``ocm``: the project's command line (``ocm_cli.main``). It publishes registry versions built by the core
(``ocm_ml.sources``) through the registry resource's publisher, for the datasets of the families declared in
``ocm_assets.families``."""
