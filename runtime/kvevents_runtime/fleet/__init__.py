"""The fleet: engines' streams carried through NATS JetStream to any number of router
replicas (`bridge` publishes, `replica` reads, `tracker` decides, `protocol` is the layout)."""
