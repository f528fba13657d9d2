"""The catalog: the artifact contract (layout, keys, manifests, readers, resolver, lineage) and the typed config."""
