"""On-storage formats that one stage writes and others read: the feature set (``featureset``) and the model
export (``export``). Each format lives in one module with its layout, commit markers, typed records (on the base in
``records``, which also checks format versions) and readers.
May import: config, errors, storage, data, models (the export builds a VideoLLM). Never imports precompute, train,
cli."""
