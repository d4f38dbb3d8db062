"""The formats of the records the upper layers keep in the DHT, torch-free: a run's training
progress (`progress`, sharded over keys as the swarm grows: `shards`) and expert declarations
(`declarations`). The writers (`apiary.optim`, `apiary.moe`) and the readers that have no torch
(the monitor, in the dht service's image) import them from here.
"""
