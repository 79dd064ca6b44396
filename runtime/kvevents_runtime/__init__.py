"""The hand-written runtime under kvevents: sockets, threads, sequencing and repair.

It imports nothing from `kvevents`. The generated package hands it the schema-bound pieces
(frame codecs, the chunk senders rendered per frame layout, the decoder) as one `Wire`, the
way protobuf's generated modules hand descriptors to their runtime. Users import `kvevents`;
this package's names are re-exported there.
"""
