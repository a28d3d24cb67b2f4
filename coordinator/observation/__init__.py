"""Observing a run: what it writes down and what people look at (docs/dashboard.md).

- :mod:`.records`: the metrics.jsonl line of a round and summary.json (pure functions);
- :mod:`.timeline`: listener fan-out and the clients-online timeline (clients.jsonl);
- :mod:`.attach`: the observers a CLI attaches (dashboard, TensorBoard) and how they stop;
- :mod:`.dashboard` (the live page) and :mod:`.prom` (Prometheus /metrics), :mod:`.tblog`
  (TensorBoard scalars), :mod:`.plots` (series and plotly figures), :mod:`.htmlreport`
  (``fedpara report``), :mod:`.listen` (``HOST:PORT``).

The round loop imports only :mod:`.records`; everything else hangs off the coordinator's events.
Modules import lazily what only some runs need (plotly, prometheus-client, tensorboard).
"""
