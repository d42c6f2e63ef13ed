//! Load generator core (flows, pacing, sink, latency).
