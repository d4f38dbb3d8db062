"""The swarm seen whole: a live web page (`apiary monitor`, `apiary dht --monitor`) and `apiary status`,
both reading the records every service keeps in the DHT (`apiary.services.records`).

- `apiary.monitor.view`: reading the swarm (`read_swarm`), watching it over time (`SwarmWatch`), its JSON;
- `apiary.monitor.page`: the HTML; `apiary.monitor.app`: the FastAPI app and JSON API;
- `apiary.monitor.service`: reaching the DHT as a client, and the `apiary monitor` process;
- `static/`: the page's script and style, and the vendored, pinned uPlot (nothing is loaded from a CDN).
"""
