"""What the producers' kv-events modules export beyond the wire, for the drop-in faces:
each dialect package re-exports the names its producer's own code imports (the list is in
schema/kvevents.schema.json, x-dialects.<dialect>.module_exports)."""
