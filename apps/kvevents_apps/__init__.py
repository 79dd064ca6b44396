"""Applications built on the public `kvevents` API: the `kvevents` command and its demo."""
