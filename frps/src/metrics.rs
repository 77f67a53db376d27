//! Prometheus metrics (`GET /metrics` on the API port): request counters and
//! histograms recorded on the request path, fleet gauges taken at scrape time.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::state::State;

/// Labels of a finished public request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP status sent to the caller (a number: formatting it per request
    /// cost more than the counter).
    pub status: u16,
    /// Client that served it (empty when none did).
    pub client: String,
    /// Model asked for (empty when the request named none).
    pub model: String,
}

/// How long the request series of a client no longer registered are kept:
/// long enough for scrapes to see their last counts, short enough that a
/// fleet whose client ids keep changing does not grow them for ever.
pub const GONE_SERIES_KEPT: Duration = Duration::from_secs(10 * 60);

/// Most request series one client gets with a model and status of their
/// own; past it, a new one is counted under model `other` and its status's
/// class (`500` for any 5xx): a client that keeps announcing new models,
/// or whose service answers every status there is, cannot grow `/metrics`
/// without bound while it stays registered.
pub const MAX_SERIES_PER_CLIENT: usize = 512;

/// How often the series of clients gone for [`GONE_SERIES_KEPT`] are
/// removed (also at each scrape).
pub const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Metrics recorded on the request path.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// The request series of each client (by id), and since when the
    /// client has not been registered, for [`Metrics::prune`].
    series: std::sync::Mutex<HashMap<String, ClientSeries>>,
    duration: Histogram,
    overhead: Histogram,
}

#[derive(Debug, Default)]
struct ClientSeries {
    labels: Vec<RequestLabels>,
    gone_since: Option<tokio::time::Instant>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every request-path metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "frpx_requests",
            "Public requests by status, client and model",
            requests.clone(),
        );
        // 100 µs .. ~61 min (0.0001 × 2.5¹⁹ s): a long streamed generation
        // still lands in a bucket of its own, not in +Inf.
        let duration = Histogram::new(DURATION_BOUNDS);
        registry.register(
            "frpx_request_duration_seconds",
            "Time from a public request's arrival to the end of its response",
            duration.clone(),
        );
        // 1 µs .. ~1.3 s in steps of 25 %, so quantiles read from it are
        // within about 12 % (the benchmark's case f reads them).
        let overhead = Histogram::new(OVERHEAD_BOUNDS);
        registry.register(
            "frpx_gateway_overhead_seconds",
            "Time frps spent on a request itself: total time to response headers minus time waiting on the upstream (queued for capacity, dialing back, waiting for the answer)",
            overhead.clone(),
        );
        Self {
            registry,
            requests,
            series: std::sync::Mutex::default(),
            duration,
            overhead,
        }
    }

    /// Counts a finished request and its duration.
    pub fn finished(&self, status: u16, client: &str, model: &str, total: Duration) {
        let labels = RequestLabels {
            status,
            client: client.to_owned(),
            model: model.to_owned(),
        };
        match self.requests.get(&labels) {
            Some(counter) => {
                counter.inc();
            }
            // A new series (rare): noted under its client, for pruning, up
            // to MAX_SERIES_PER_CLIENT of its own.
            None => {
                let labels = if client.is_empty() {
                    labels
                } else {
                    let mut series = self.series.lock().expect("series lock");
                    let of_client = series.entry(labels.client.clone()).or_default();
                    let labels = if of_client.labels.len() >= MAX_SERIES_PER_CLIENT
                        && !of_client.labels.contains(&labels)
                    {
                        RequestLabels {
                            status: labels.status / 100 * 100,
                            model: "other".into(),
                            ..labels
                        }
                    } else {
                        labels
                    };
                    if !of_client.labels.contains(&labels) {
                        of_client.labels.push(labels.clone());
                    }
                    labels
                };
                self.requests.get_or_create(&labels).inc();
            }
        }
        self.duration.observe(total.as_secs_f64());
    }

    /// Removes the request series of clients that have not been registered
    /// for [`GONE_SERIES_KEPT`]; `registered` says whether a client id is.
    /// Run at each scrape and every [`PRUNE_EVERY`] (an frps never scraped
    /// would keep them all).
    pub fn prune(&self, registered: impl Fn(&str) -> bool) {
        let now = tokio::time::Instant::now();
        let mut series = self.series.lock().expect("series lock");
        series.retain(|client, of_client| {
            if registered(client) {
                of_client.gone_since = None;
                return true;
            }
            let since = *of_client.gone_since.get_or_insert(now);
            if now - since < GONE_SERIES_KEPT {
                return true;
            }
            for labels in &of_client.labels {
                self.requests.remove(labels);
            }
            false
        });
    }

    /// Records the gateway's own time for one request.
    pub fn overhead(&self, overhead: Duration) {
        self.overhead.observe(overhead.as_secs_f64());
    }

    /// The text exposition of every metric, including a snapshot of the fleet.
    pub fn render(&self, state: &State) -> String {
        self.prune(|id| state.registry.get(id).is_some());
        let mut out = String::new();
        let mut fleet = Registry::default();
        fleet.register_collector(Box::new(FleetSnapshot::take(state)));
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .and_then(|()| prometheus_client::encoding::text::encode_registry(&mut out, &fleet))
            .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut out))
            .expect("writing to a String cannot fail");
        out
    }
}

/// Gauges read from the state at scrape time.
#[derive(Debug)]
struct FleetSnapshot {
    clients_online: i64,
    in_flight: i64,
    pending: i64,
    bytes_in: u64,
    bytes_out: u64,
    auth: Vec<(&'static str, u64)>,
    rate_limited: [(&'static str, u64); 2],
    queues: Vec<(String, usize)>,
    per_client: Vec<ClientGauges>,
}

#[derive(Debug)]
struct ClientGauges {
    id: String,
    in_flight: i64,
    healthy: bool,
    /// Taken by the router now: healthy and not cooling down.
    routable: bool,
    cpu: Option<f64>,
    /// Seconds since the client's system metrics came.
    system_age: Option<f64>,
    memory_used: Option<i64>,
    memory_total: Option<i64>,
    gpus: Vec<GpuGauges>,
}

#[derive(Debug, PartialEq)]
struct GpuGauges {
    /// The `gpu` label.
    index: String,
    name: String,
    utilization: f64,
    memory_used: i64,
}

/// Buckets of `frpx_request_duration_seconds`.
const DURATION_BUCKETS: u16 = 20;

/// `frpx_request_duration_seconds`' upper bounds: 0.0001 × 2.5ⁱ s for i
/// in 0..20, as prometheus_client's `exponential_buckets` computes them
/// with glibc's `pow` (a test holds them equal). Written out: frps's own
/// `pow` ([`common::define_pow`]) may differ from glibc's in the last bit,
/// and a bound changed by a bit is a new `le` label, a new series.
const DURATION_BOUNDS: [f64; DURATION_BUCKETS as usize] = [
    0.0001,
    0.00025,
    0.000625,
    0.0015625,
    0.00390625,
    0.009765625,
    0.0244140625,
    0.06103515625,
    0.152587890625,
    0.3814697265625,
    0.95367431640625,
    2.384185791015625,
    5.9604644775390625,
    14.901161193847656,
    37.25290298461914,
    93.13225746154785,
    232.83064365386963,
    582.0766091346741,
    1455.1915228366852,
    3637.978807091713,
];

/// `frpx_gateway_overhead_seconds`' upper bounds: 0.000001 × 1.25ⁱ s for i
/// in 0..64 (see [`DURATION_BOUNDS`]).
const OVERHEAD_BOUNDS: [f64; 64] = [
    1e-06,
    1.2499999999999999e-06,
    1.5624999999999999e-06,
    1.953125e-06,
    2.44140625e-06,
    3.0517578124999997e-06,
    3.814697265625e-06,
    4.76837158203125e-06,
    5.9604644775390625e-06,
    7.450580596923828e-06,
    9.313225746154785e-06,
    1.1641532182693481e-05,
    1.4551915228366852e-05,
    1.8189894035458565e-05,
    2.2737367544323206e-05,
    2.8421709430404007e-05,
    3.552713678800501e-05,
    4.440892098500626e-05,
    5.551115123125783e-05,
    6.938893903907228e-05,
    8.673617379884035e-05,
    0.00010842021724855044,
    0.00013552527156068805,
    0.00016940658945086007,
    0.00021175823681357508,
    0.00026469779601696886,
    0.00033087224502121107,
    0.00041359030627651384,
    0.0005169878828456423,
    0.0006462348535570528,
    0.0008077935669463161,
    0.001009741958682895,
    0.001262177448353619,
    0.0015777218104420234,
    0.0019721522630525294,
    0.0024651903288156617,
    0.0030814879110195774,
    0.0038518598887744716,
    0.004814824860968089,
    0.006018531076210112,
    0.00752316384526264,
    0.0094039548065783,
    0.011754943508222876,
    0.014693679385278593,
    0.018367099231598242,
    0.0229588740394978,
    0.02869859254937225,
    0.03587324068671532,
    0.04484155085839415,
    0.05605193857299268,
    0.07006492321624086,
    0.08758115402030106,
    0.10947644252537633,
    0.13684555315672042,
    0.17105694144590053,
    0.21382117680737564,
    0.2672764710092196,
    0.33409558876152445,
    0.4176194859519055,
    0.522024357439882,
    0.6525304467998524,
    0.8156630584998155,
    1.0195788231247696,
    1.2744735289059619,
];

/// A byte count a client reported, as a gauge's value: one past `i64::MAX`
/// (from a faulty or hostile frpc) is shown as the largest, not negative.
fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One client's GPUs, labelled by the index frpc reports for each (NVML's,
/// so a card keeps its label when another cannot be read), or by their
/// place in the list when an index is missing or repeated (older frpc).
fn gpu_gauges(gpus: &[common::protocol::GpuInfo]) -> Vec<GpuGauges> {
    let mut seen = std::collections::HashSet::new();
    let own = gpus.iter().all(|g| g.index.is_some_and(|i| seen.insert(i)));
    gpus.iter()
        .enumerate()
        .map(|(place, g)| GpuGauges {
            index: match (own, g.index) {
                (true, Some(i)) => i.to_string(),
                _ => place.to_string(),
            },
            name: g.name.clone(),
            utilization: g.utilization as f64,
            memory_used: saturating_i64(g.memory_used),
        })
        .collect()
}

impl FleetSnapshot {
    fn take(state: &State) -> Self {
        // A client being disconnected is shown nowhere, as in /api/stats:
        // neither counted nor given its own gauges.
        let clients = state.registry.online();
        let keys = &state.keys.stats;
        Self {
            clients_online: clients.len() as i64,
            in_flight: clients
                .iter()
                .map(|c| c.in_flight.load(Ordering::Relaxed) as i64)
                .sum(),
            pending: state.pending.len() as i64,
            bytes_in: state.stats.bytes_in.load(Ordering::Relaxed),
            bytes_out: state.stats.bytes_out.load(Ordering::Relaxed),
            auth: vec![
                ("static", keys.static_hits.load(Ordering::Relaxed)),
                ("local", keys.local_hits.load(Ordering::Relaxed)),
                ("redis", keys.redis_hits.load(Ordering::Relaxed)),
                ("database", keys.db_hits.load(Ordering::Relaxed)),
                ("database_error", keys.db_errors.load(Ordering::Relaxed)),
                ("throttled", keys.throttled.load(Ordering::Relaxed)),
                ("busy", keys.turn_timeouts.load(Ordering::Relaxed)),
            ],
            rate_limited: [
                ("rpm", state.stats.rate_limited_rpm.load(Ordering::Relaxed)),
                (
                    "concurrency",
                    state.stats.rate_limited_concurrency.load(Ordering::Relaxed),
                ),
            ],
            queues: state.queues.depths_listed(&state.registry),
            per_client: clients
                .iter()
                .map(|c| {
                    let (sys, age) = c.system_aged().unzip();
                    ClientGauges {
                        id: c.id.clone(),
                        in_flight: c.in_flight.load(Ordering::Relaxed) as i64,
                        healthy: c.is_healthy(),
                        routable: c.is_routable(std::time::Instant::now()),
                        cpu: sys.as_ref().map(|s| s.cpu_usage as f64),
                        system_age: age.map(|a| a.as_secs_f64()),
                        memory_used: sys.as_ref().map(|s| saturating_i64(s.memory_used)),
                        memory_total: sys.as_ref().map(|s| saturating_i64(s.memory_total)),
                        gpus: sys.map(|s| gpu_gauges(&s.gpus)).unwrap_or_default(),
                    }
                })
                .collect(),
        }
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// Starts a metric family with `name`, `help` and `kind`.
fn family<'a>(
    encoder: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &'a str,
    kind: MetricType,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, std::fmt::Error> {
    encoder.encode_descriptor(name, help, None, kind)
}

impl Collector for FleetSnapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "frpx_clients_online",
            "Registered clients",
            self.clients_online,
        )?;
        gauge(
            &mut encoder,
            "frpx_in_flight_requests",
            "Requests being served",
            self.in_flight,
        )?;
        gauge(
            &mut encoder,
            "frpx_pending_connections",
            "Dial-backs requested and not yet arrived",
            self.pending,
        )?;

        let mut bytes = family(
            &mut encoder,
            "frpx_bytes",
            "Body bytes through the public port",
            MetricType::Counter,
        )?;
        for (direction, v) in [("in", self.bytes_in), ("out", self.bytes_out)] {
            ConstCounter::new(v).encode(bytes.encode_family(&[("direction", direction)])?)?;
        }

        let mut queue = family(
            &mut encoder,
            "frpx_queue_depth",
            "Requests waiting for capacity, by model (* for requests naming none)",
            MetricType::Gauge,
        )?;
        for (model, n) in &self.queues {
            ConstGauge::new(*n as i64)
                .encode(queue.encode_family(&[("model", model.as_str())])?)?;
        }

        let mut auth = family(
            &mut encoder,
            "frpx_auth_lookups",
            "API key validations by the layer that answered (local = in-process cache hit; throttled = refused unasked: the caller's address had spent its failed lookups; busy = unavailable unasked: the caller's address had lookups under way all the while)",
            MetricType::Counter,
        )?;
        for (layer, v) in &self.auth {
            ConstCounter::new(*v).encode(auth.encode_family(&[("layer", *layer)])?)?;
        }

        let mut limited = family(
            &mut encoder,
            "frpx_rate_limited_requests",
            "Public requests refused (429) by their API key's limits, by reason (rpm, concurrency)",
            MetricType::Counter,
        )?;
        for (reason, v) in &self.rate_limited {
            ConstCounter::new(*v).encode(limited.encode_family(&[("reason", *reason)])?)?;
        }

        type Field = fn(&ClientGauges) -> Option<f64>;
        let per_client: [(&str, &str, Field); 7] = [
            (
                "frpx_client_in_flight_requests",
                "Requests being served by the client",
                |c| Some(c.in_flight as f64),
            ),
            (
                "frpx_client_healthy",
                "1 when the client's local service answers",
                |c| Some(f64::from(u8::from(c.healthy))),
            ),
            (
                "frpx_client_routable",
                "1 when frps sends the client requests: its service answers and it is not cooling down after failed requests",
                |c| Some(f64::from(u8::from(c.routable))),
            ),
            (
                "frpx_client_cpu_usage_percent",
                "CPU usage reported by the client",
                |c| c.cpu,
            ),
            (
                "frpx_client_system_age_seconds",
                "Seconds since the client's system metrics (CPU, memory, disks, GPUs) came",
                |c| c.system_age,
            ),
            (
                "frpx_client_memory_used_bytes",
                "Memory in use reported by the client",
                |c| c.memory_used.map(|v| v as f64),
            ),
            (
                "frpx_client_memory_total_bytes",
                "Total memory reported by the client",
                |c| c.memory_total.map(|v| v as f64),
            ),
        ];
        for (name, help, field) in per_client {
            let mut family = family(&mut encoder, name, help, MetricType::Gauge)?;
            for c in &self.per_client {
                if let Some(v) = field(c) {
                    ConstGauge::new(v)
                        .encode(family.encode_family(&[("client", c.id.as_str())])?)?;
                }
            }
        }
        type GpuField = fn(&GpuGauges) -> f64;
        let per_gpu: [(&str, &str, GpuField); 2] = [
            (
                "frpx_client_gpu_utilization_percent",
                "GPU utilisation reported by the client",
                |g| g.utilization,
            ),
            (
                "frpx_client_gpu_memory_used_bytes",
                "GPU memory in use reported by the client",
                |g| g.memory_used as f64,
            ),
        ];
        for (name, help, field) in per_gpu {
            let mut family = family(&mut encoder, name, help, MetricType::Gauge)?;
            for c in &self.per_client {
                for gpu in &c.gpus {
                    let labels = [
                        ("client", c.id.as_str()),
                        ("gpu", gpu.index.as_str()),
                        ("name", gpu.name.as_str()),
                    ];
                    ConstGauge::new(field(gpu)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::protocol::GpuInfo;

    fn gpu(index: Option<u32>) -> GpuInfo {
        GpuInfo {
            index,
            name: "g".into(),
            ..Default::default()
        }
    }

    fn labels(gpus: &[GpuInfo]) -> Vec<String> {
        gpu_gauges(gpus).into_iter().map(|g| g.index).collect()
    }

    #[test]
    fn gpus_keep_their_own_index_unless_one_is_missing_or_repeated() {
        assert_eq!(labels(&[gpu(Some(1)), gpu(Some(3))]), ["1", "3"]);
        assert_eq!(labels(&[gpu(None), gpu(None)]), ["0", "1"]);
        assert_eq!(labels(&[gpu(Some(2)), gpu(None)]), ["0", "1"]);
        assert_eq!(labels(&[gpu(Some(0)), gpu(Some(0))]), ["0", "1"]);
        // A repeated index may not collide with a place either.
        assert_eq!(
            labels(&[gpu(Some(1)), gpu(Some(1)), gpu(Some(0))]),
            ["0", "1", "2"]
        );
        assert!(labels(&[]).is_empty());
    }

    /// The `frpx_requests_total` series `metrics` exposes.
    fn series(metrics: &Metrics) -> usize {
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &metrics.registry).unwrap();
        out.lines()
            .filter(|l| l.starts_with("frpx_requests_total{"))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn series_of_clients_gone_for_ten_minutes_are_removed() {
        let metrics = Metrics::new();
        let ms = Duration::from_millis(5);
        for (status, client, model) in [
            (200, "stays", "m"),
            (200, "leaves", "m"),
            (500, "leaves", "m"),
            (200, "leaves", "other"),
            (200, "leaves", "m"),
            (503, "", ""),
        ] {
            metrics.finished(status, client, model, ms);
        }
        assert_eq!(series(&metrics), 5);
        let registered = |id: &str| id == "stays";
        metrics.prune(registered);
        tokio::time::advance(GONE_SERIES_KEPT - Duration::from_secs(1)).await;
        metrics.prune(registered);
        assert_eq!(series(&metrics), 5, "kept for a while");
        // Back in time: its count goes on.
        metrics.prune(|_| true);
        tokio::time::advance(GONE_SERIES_KEPT).await;
        metrics.prune(|_| true);
        assert_eq!(series(&metrics), 5);
        metrics.prune(registered);
        tokio::time::advance(GONE_SERIES_KEPT).await;
        metrics.prune(registered);
        assert_eq!(series(&metrics), 2, "the client's three are gone");
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &metrics.registry).unwrap();
        assert!(!out.contains("leaves"), "{out}");
        assert!(out.contains(r#"client="stays""#), "{out}");
        // Were it to come back, it starts over.
        metrics.finished(200, "leaves", "m", ms);
        assert_eq!(series(&metrics), 3);
    }

    #[test]
    fn a_client_gets_a_bounded_number_of_series() {
        let metrics = Metrics::new();
        let ms = Duration::from_millis(5);
        // Models announced and replaced, statuses of every kind.
        for n in 0..MAX_SERIES_PER_CLIENT {
            metrics.finished(200, "rotating", &format!("model-{n}"), ms);
        }
        assert_eq!(series(&metrics), MAX_SERIES_PER_CLIENT);
        for status in 100..1000 {
            metrics.finished(status, "rotating", &format!("new-{status}"), ms);
        }
        // One series per status class past the bound.
        assert_eq!(series(&metrics), MAX_SERIES_PER_CLIENT + 9);
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &metrics.registry).unwrap();
        assert!(
            out.contains(
                r#"frpx_requests_total{status="500",client="rotating",model="other"} 100"#
            ),
            "{out}"
        );
        // A series it had before the bound still counts on its own.
        metrics.finished(200, "rotating", "model-0", ms);
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &metrics.registry).unwrap();
        assert!(
            out.contains(
                r#"frpx_requests_total{status="200",client="rotating",model="model-0"} 2"#
            ),
            "{out}"
        );
        // Another client has its own room.
        metrics.finished(200, "other-box", "model-0", ms);
        assert_eq!(series(&metrics), MAX_SERIES_PER_CLIENT + 10);
    }

    #[test]
    fn reported_byte_counts_past_i64_are_the_largest_gauge_not_a_negative_one() {
        assert_eq!(saturating_i64(5), 5);
        assert_eq!(saturating_i64(i64::MAX as u64), i64::MAX);
        assert_eq!(saturating_i64(u64::MAX), i64::MAX);
        let g = GpuInfo {
            memory_used: u64::MAX,
            ..gpu(Some(0))
        };
        assert_eq!(gpu_gauges(&[g])[0].memory_used, i64::MAX);
    }

    #[test]
    fn request_durations_have_buckets_up_to_an_hour() {
        let top = *DURATION_BOUNDS.last().unwrap();
        assert!((3600.0..4000.0).contains(&top), "{top}");
        assert_eq!(DURATION_BOUNDS[0], 0.0001);
    }

    /// The written-out bounds are, to the bit, the ones frps computed
    /// before (a changed `le` label would start new series).
    #[test]
    fn bounds_are_the_exponential_buckets() {
        use prometheus_client::metrics::histogram::exponential_buckets;
        let bits = |v: &[f64]| v.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
        let duration: Vec<f64> = exponential_buckets(0.0001, 2.5, DURATION_BUCKETS).collect();
        assert_eq!(bits(&DURATION_BOUNDS), bits(&duration));
        let overhead: Vec<f64> = exponential_buckets(0.000001, 1.25, 64).collect();
        assert_eq!(bits(&OVERHEAD_BOUNDS), bits(&overhead));
    }
}
