"""The averager's local API: how a trainer hands its tensors to its participant's averager.

`spec` declares the service and the tensor schema; `servicer` is the averager's side,
`client` the trainer's (importing it loads neither the servicer nor the `Averager`);
`shared_memory` maps the segment through which rounds run when both share a host.
"""
