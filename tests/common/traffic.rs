//! The crash and disk full tests' traffic and their final check: payments
//! driven over HTTP among a dozen accounts (some rejected, some reversed), a
//! ledger of what was acknowledged, and the proof afterwards that each
//! acknowledged payment is terminal exactly once and money moved exactly once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::get;

pub const ACCOUNTS: usize = 12;
pub const OPENING_CENTS: i64 = 50_000;

/// A payment of the traffic: (from, to, amount).
pub type Payment = (String, String, i64);

/// What the driver learned about each payment it sent.
#[derive(Default)]
pub struct Ledger {
    /// Payments answered 202: they must exist after any crash.
    pub acknowledged: HashMap<String, Payment>,
    /// Payments whose request failed mid-crash, or that a stopping server
    /// refused with 503: they may or may not exist.
    pub unknown: HashMap<String, Payment>,
    /// Payments answered 507 (no space for them), with the answer: they must
    /// not exist. Only in a ledger [`Ledger::with_refusals`]; in any other a
    /// 507 fails the test.
    pub refused: HashMap<String, Value>,
    /// How many requests got each status (0: no answer).
    pub answers: BTreeMap<u16, u64>,
    refusals_expected: bool,
}

impl Ledger {
    /// A ledger for traffic on a full disk, where 507 is an expected answer.
    pub fn with_refusals() -> Self {
        Self {
            refusals_expected: true,
            ..Self::default()
        }
    }

    /// Books `status` (0: no answer), with its body `answer`, for payment `id`.
    pub fn book(&mut self, id: String, payment: Payment, status: u16, answer: Value) {
        *self.answers.entry(status).or_default() += 1;
        match status {
            202 => {
                self.acknowledged.insert(id, payment);
            }
            // A server that is stopping refuses with 503; nothing was written.
            0 | 503 => {
                self.unknown.insert(id, payment);
            }
            507 if self.refusals_expected => {
                self.refused.insert(id, answer);
            }
            _ => panic!("unexpected answer {status} for {id} {payment:?}: {answer}"),
        }
    }
}

pub fn account(n: usize) -> String {
    format!("acc-{n:02}")
}

pub async fn open_accounts(client: &reqwest::Client, base: &str) {
    for n in 0..ACCOUNTS {
        super::open_account(client, base, &account(n), OPENING_CENTS).await;
    }
}

/// A payment between two of the accounts, of 0.01 to 30.00; one in ten to an
/// account that does not exist (reversed), one in eight larger than most
/// accounts hold (rejected).
pub fn random_payment() -> Payment {
    let mut rng = rand::thread_rng();
    loop {
        let from = account(rng.gen_range(0..ACCOUNTS));
        let to = if rng.gen_ratio(1, 10) {
            "ghost".to_owned()
        } else {
            account(rng.gen_range(0..ACCOUNTS))
        };
        let amount = if rng.gen_ratio(1, 8) {
            60_000
        } else {
            rng.gen_range(1..3_000)
        };
        if from != to {
            return (from, to, amount);
        }
    }
}

/// Sends payment `id` and books the answer in `ledger`; returns its status
/// (0: no answer).
pub async fn submit(
    client: &reqwest::Client,
    base: &str,
    ledger: &Mutex<Ledger>,
    id: String,
    payment: Payment,
) -> u16 {
    let (from, to, amount) = &payment;
    let body = json!({"id": id, "from": from, "to": to, "amount": amount});
    let sent = client
        .post(format!("{base}/api/v1/payments"))
        .json(&body)
        .send()
        .await;
    let (status, answer) = match sent {
        Ok(response) if response.status() == 202 => (202, Value::Null),
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    };
    ledger.lock().unwrap().book(id, payment, status, answer);
    status
}

/// Payments sent from four workers in the background (ids starting with
/// `r{round}-`) until stopped.
pub struct Driver {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Driver {
    /// Starts sending payments to the server at `base`, booking the answers
    /// in `ledger`.
    pub fn start(base: &str, ledger: &Arc<Mutex<Ledger>>, round: usize) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(drive(base.to_owned(), ledger.clone(), round, stop.clone()));
        Self { stop, task }
    }

    /// Stops sending and waits for the requests under way.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

async fn drive(base: String, ledger: Arc<Mutex<Ledger>>, round: usize, stop: CancellationToken) {
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let (base, ledger, stop) = (base.clone(), ledger.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let id = format!("r{round}-w{worker}-{n}");
                if submit(&client, &base, &ledger, id, random_payment()).await != 202 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Terminal states found by [`check`].
pub struct Outcome {
    pub statuses: BTreeMap<String, String>,
    /// Payments that waited for their payer's previous one (screening's
    /// `single_inflight_debit`).
    pub waited: usize,
}

impl Outcome {
    pub fn count(&self, status: &str) -> u64 {
        self.statuses
            .values()
            .filter(|v| v.as_str() == status)
            .count() as u64
    }

    /// Whether payments were confirmed, rejected and reversed.
    pub fn every_path_taken(&self) -> bool {
        ["confirmed", "rejected", "reversed"]
            .iter()
            .all(|status| self.count(status) > 0)
    }
}

/// Checks, on a running server, that every acknowledged payment is terminal
/// with its own body and the hops of its outcome each once; no refused one
/// exists; every balance is
/// its opening balance plus exactly the confirmed payments; the pipeline's
/// counts match; nothing is in flight; money is conserved.
pub async fn check(client: &reqwest::Client, base: &str, ledger: &Ledger) -> Outcome {
    let mut statuses: BTreeMap<String, String> = BTreeMap::new();
    let mut waited = 0;
    let mut balances = [OPENING_CENTS; ACCOUNTS];
    let everything = ledger
        .acknowledged
        .iter()
        .map(|p| (p, true))
        .chain(ledger.unknown.iter().map(|p| (p, false)));
    for ((id, (from, to, amount)), acknowledged) in everything {
        let url = format!("{base}/api/v1/payments/{id}");
        let started = std::time::Instant::now();
        let payment = loop {
            let (status, body) = get(client, &url).await;
            if status == 404 {
                assert!(!acknowledged, "acknowledged payment {id} was lost");
                break None;
            }
            if ["confirmed", "rejected", "reversed"].contains(&body["status"].as_str().unwrap()) {
                break Some(body);
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "payment {id} not terminal: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let Some(payment) = payment else { continue };
        assert_eq!(
            (&payment["from"], &payment["to"], &payment["amount"]),
            (&json!(from), &json!(to), &json!(amount))
        );
        let status = payment["status"].as_str().unwrap().to_owned();
        // Each hop once: a record applied twice would show twice. Screening
        // (when on) adds its step, and a wait for the payer's previous payment.
        let mut stages = super::lineage_stages(&payment);
        waited += usize::from(stages.contains(&"waiting"));
        for step in ["screened", "waiting"] {
            let count = stages.iter().filter(|s| **s == step).count();
            assert!(count <= 1, "{id}: {step} {count} times: {payment}");
            stages.retain(|s| *s != step);
        }
        assert_eq!(stages, super::expected_stages(&status), "{id}: {payment}");
        if status == "confirmed" {
            let index = |name: &str| name[4..].parse::<usize>().unwrap();
            balances[index(from)] -= amount;
            balances[index(to)] += amount;
        }
        statuses.insert(id.clone(), status);
    }
    for (id, answer) in &ledger.refused {
        let (status, body) = get(client, &format!("{base}/api/v1/payments/{id}")).await;
        assert_eq!(
            status, 404,
            "payment {id} was refused ({answer}) but exists: {body}"
        );
    }
    for (n, expected) in balances.iter().enumerate() {
        let (_, body) = get(client, &format!("{base}/api/v1/accounts/{}", account(n))).await;
        assert_eq!(
            body["balance"].as_i64().unwrap(),
            *expected,
            "{}: money moved more or less than once",
            account(n)
        );
        assert!(*expected >= 0);
    }
    let outcome = Outcome { statuses, waited };
    let (_, metrics) = get(client, &format!("{base}/api/v1/metrics/pipeline")).await;
    for status in ["confirmed", "rejected", "reversed"] {
        assert_eq!(
            metrics[status]["count"].as_u64().unwrap(),
            outcome.count(status),
            "{status}: {metrics}"
        );
    }
    assert_eq!(metrics["inflight"]["count"], 0, "{metrics}");
    let (_, integrity) = get(client, &format!("{base}/api/v1/ledger/integrity")).await;
    assert_eq!(integrity["ok"], true, "{integrity}");
    assert_eq!(integrity["in_transit"], 0, "{integrity}");
    assert_eq!(
        integrity["total_funded"].as_i64().unwrap(),
        OPENING_CENTS * ACCOUNTS as i64
    );
    outcome
}

/// Asserts the store of a stopped server under `dir` holds no dead letter.
pub fn assert_no_dead_letters(dir: &Path) {
    let store = kpay::store::Store::open(&dir.join("state"), 1 << 20).unwrap();
    let letters: Vec<(String, kpay::ops::dlq::DeadLetter)> =
        store.scan(kpay::ops::dlq::TABLE, None, 10).unwrap();
    assert!(
        letters.is_empty(),
        "dead letters after crashes: {letters:?}"
    );
}
