"""ocm's orchestrator-free ML core: data sources, models, training, tuning and serving.

Nothing here imports dagster, reads ``os.environ`` or opens its own connections; the resources in
``ocm_resources`` hand it paths, URIs and handles.
"""
