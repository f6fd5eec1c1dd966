//! The dashboard in a real browser: headless Chromium driven over WebDriver
//! (chromedriver) against a kpay server on a loopback port. Screenshots of
//! the main views go to `target/browser/` (and `failure.png` when a step fails).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them).
//! Without them the test says so and passes outside CI; in CI it fails.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::browser::{browser, chromium_present, Driver, CHROMEDRIVER, CHROMIUM};
use common::{get, operator_client, post, skip_or_fail_in_ci, TestServer, OPERATOR_TOKEN};
use fantoccini::{Client, Locator};
use kpay::model::{codec, now_ms, Envelope, Event, SourceTopic};
use serde_json::{json, Value};

fn shots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits until `check` holds, polling every 100 ms.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > limit {
            return Err(format!("{what}: not within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The seqs of the audit panel's rows, top to bottom.
async fn audit_rows(client: &Client) -> Vec<u64> {
    let css = Locator::Css("#audit-list tbody tr[data-seq]");
    let mut seqs = Vec::new();
    for row in client.find_all(css).await.unwrap_or_default() {
        let seq = row.attr("data-seq").await.ok().flatten();
        seqs.push(seq.and_then(|s| s.parse().ok()).unwrap_or(u64::MAX));
    }
    seqs
}

/// The seqs of `GET /api/v1/logs/audit?{query}`.
async fn api_seqs(c: &reqwest::Client, base: &str, query: &str) -> Vec<u64> {
    let (_, page) = get(c, &format!("{base}/api/v1/logs/audit?{query}")).await;
    let items = page["items"].as_array().cloned().unwrap_or_default();
    items.iter().filter_map(|e| e["seq"].as_u64()).collect()
}

/// The audit panel shows what the API answers for its filters and pages:
/// the newest page, the one older, pauses only, and the submission class.
async fn audit_panel(client: &Client, c: &reqwest::Client, base: &str) -> Result<(), String> {
    let shown = |what: &'static str, want: Vec<u64>| async move {
        if want.is_empty() {
            return Err(format!("{what}: the API lists nothing"));
        }
        eventually(what, Duration::from_secs(15), || async {
            audit_rows(client).await == want
        })
        .await
    };
    // More control entries than the panel's page of 20.
    for _ in 0..25 {
        let rate = json!({"payments_per_second": 0});
        let url = format!("{base}/api/v1/control/rate-limit");
        let status = c
            .put(url)
            .json(&rate)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if status.status() != 200 {
            return Err(format!("rate limit answered {}", status.status()));
        }
    }
    let newest = api_seqs(c, base, "limit=20").await;
    shown("newest audit page", newest.clone()).await?;
    click(client, "#btn-audit-older").await?;
    let before = newest.last().copied().unwrap_or(0);
    shown(
        "older audit page",
        api_seqs(c, base, &format!("limit=20&before={before}")).await,
    )
    .await?;
    fill(client, "#audit-action", "pause").await?;
    click(client, "#btn-audit-apply").await?;
    shown(
        "pauses only",
        api_seqs(c, base, "limit=20&action=pause").await,
    )
    .await?;
    fill(client, "#audit-action", "").await?;
    let pick = "document.querySelector('#audit-class').value = 'submission';";
    client
        .execute(pick, vec![])
        .await
        .map_err(|e| e.to_string())?;
    click(client, "#btn-audit-apply").await?;
    let submissions = api_seqs(c, base, "limit=20&class=submission").await;
    shown("submission class", submissions).await?;
    screenshot(client, "audit-filtered.png").await;
    Ok(())
}

async fn text(client: &Client, css: &str) -> String {
    match client.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// A number shown in the page (thousands separators and currency removed).
async fn number(client: &Client, css: &str) -> Option<f64> {
    let shown = text(client, css).await;
    let digits: String = shown
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
        .collect();
    digits.parse().ok()
}

async fn click(client: &Client, css: &str) -> Result<(), String> {
    let element = client
        .find(Locator::Css(css))
        .await
        .map_err(|e| format!("{css}: {e}"))?;
    element
        .click()
        .await
        .map_err(|e| format!("click {css}: {e}"))
}

async fn fill(client: &Client, css: &str, value: &str) -> Result<(), String> {
    let element = client
        .find(Locator::Css(css))
        .await
        .map_err(|e| format!("{css}: {e}"))?;
    element
        .clear()
        .await
        .map_err(|e| format!("clear {css}: {e}"))?;
    element
        .send_keys(value)
        .await
        .map_err(|e| format!("type into {css}: {e}"))
}

async fn screenshot(client: &Client, name: &str) {
    if let Ok(png) = client.screenshot().await {
        let _ = std::fs::write(shots().join(name), png);
    }
}

/// Errors the page caught (`window.onerror`, rejections, `console.error`).
async fn page_errors(client: &Client) -> Vec<String> {
    let value = client
        .execute(
            "return window.__kpayErrors || ['no error capture installed'];",
            vec![],
        )
        .await
        .unwrap_or(Value::Null);
    serde_json::from_value(value).unwrap_or_else(|_| vec!["unreadable".into()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    if !chromium_present() {
        let why = format!(
            "{CHROMIUM} or {CHROMEDRIVER} not found (apt-get install chromium chromium-driver)"
        );
        skip_or_fail_in_ci("dashboard_in_a_real_browser", &why);
        return;
    }
    // Raw records (a dead letter to replay) need tokens: the dashboard gets
    // the operator token through its token form.
    let (server, _) = TestServer::builder()
        .raw_records()
        .config(|c| c.demo.accounts = 10)
        .start()
        .await;
    let driver = Driver::start().await;
    let client = browser(&driver).await;
    let result = steps(&client, &server).await;
    if let Err(failure) = &result {
        screenshot(&client, "failure.png").await;
        let errors = page_errors(&client).await;
        let _ = client.close().await;
        panic!(
            "{failure}\npage errors: {errors:?}\nscreenshot: {}",
            shots().join("failure.png").display()
        );
    }
    let _ = client.close().await;
    server.stop().await;
}

async fn steps(client: &Client, server: &TestServer) -> Result<(), String> {
    let (c, base) = (operator_client(), server.base.clone());
    let seconds = Duration::from_secs;
    client.goto(&base).await.map_err(|e| e.to_string())?;
    fill(client, "#token-input", OPERATOR_TOKEN).await?;
    click(client, "#token-form button[type=submit]").await?;
    eventually("token set", seconds(5), || async {
        text(client, "#token-state").await.contains("token set")
    })
    .await?;
    eventually("live updates", seconds(10), || async {
        text(client, "#conn-status").await.contains("live")
    })
    .await?;
    eventually("accounts table", seconds(10), || async {
        client
            .find_all(Locator::Css("#accounts-table tbody tr[data-id]"))
            .await
            .is_ok_and(|rows| !rows.is_empty())
    })
    .await?;
    for link in ["a#link-swagger", "a#link-openapi"] {
        client
            .find(Locator::Css(link))
            .await
            .map_err(|e| format!("{link}: {e}"))?;
    }
    eventually("cluster line", seconds(10), || async {
        text(client, "#cluster-view")
            .await
            .contains("Single instance")
    })
    .await?;
    screenshot(client, "dashboard-empty.png").await;

    // The generator makes the numbers move.
    fill(client, "#gen-rate", "200").await?;
    fill(client, "#gen-accounts", "50").await?;
    click(client, "#btn-gen-start").await?;
    eventually("generator running", seconds(10), || async {
        text(client, "#gen-status").await.contains("running")
    })
    .await?;
    let first = number(client, "#m-confirmed-count").await.unwrap_or(0.0);
    eventually("confirmed count rising", seconds(15), || async {
        number(client, "#m-confirmed-count").await.unwrap_or(0.0) > first + 100.0
    })
    .await?;
    tokio::time::sleep(seconds(3)).await;
    screenshot(client, "dashboard-running.png").await;

    // Pause with payments held in flight: draining, then paused, and the
    // confirmed count stops rising.
    let shared = server.runtime().clone();
    shared.hold_input("account", SourceTopic::Inflight, true);
    eventually("payments in flight", seconds(10), || async {
        number(client, "#m-inflight-count").await.unwrap_or(0.0) > 0.0
    })
    .await?;
    click(client, "#btn-pause").await?;
    eventually("draining", seconds(10), || async {
        text(client, "#control-state").await.trim() == "draining"
    })
    .await?;
    screenshot(client, "control-draining.png").await;
    shared.hold_input("account", SourceTopic::Inflight, false);
    eventually("paused", seconds(10), || async {
        text(client, "#control-state").await.trim() == "paused"
    })
    .await?;
    tokio::time::sleep(seconds(2)).await;
    let paused_at = number(client, "#m-confirmed-count").await;
    tokio::time::sleep(seconds(3)).await;
    if number(client, "#m-confirmed-count").await != paused_at {
        return Err("the confirmed count kept rising while paused".into());
    }
    screenshot(client, "control-paused.png").await;
    click(client, "#btn-resume").await?;
    eventually("running again", seconds(10), || async {
        text(client, "#control-state").await.trim() == "running"
    })
    .await?;
    let resumed_at = number(client, "#m-confirmed-count").await.unwrap_or(0.0);
    eventually("confirmed rising after resume", seconds(15), || async {
        number(client, "#m-confirmed-count").await.unwrap_or(0.0) > resumed_at
    })
    .await?;
    click(client, "#btn-gen-stop").await?;
    eventually("generator stopped", seconds(10), || async {
        text(client, "#gen-status").await.contains("stopped")
    })
    .await?;

    // A payment through the form, confirmed, with its lineage.
    fill(client, "#pay-id", "ui-payment-1").await?;
    fill(client, "#pay-from", "demo-0001").await?;
    fill(client, "#pay-to", "demo-0002").await?;
    fill(client, "#pay-amount", "12.50").await?;
    click(client, "#btn-pay-submit").await?;
    eventually("payment accepted", seconds(10), || async {
        text(client, "#pay-result").await.contains("ui-payment-1")
    })
    .await?;
    eventually("payment confirmed", seconds(15), || async {
        text(client, "#payment-status").await.contains("confirmed")
    })
    .await?;
    let mut stages = Vec::new();
    for hop in client
        .find_all(Locator::Css("#payment-lineage .hop"))
        .await
        .map_err(|e| e.to_string())?
    {
        stages.push(
            hop.attr("data-stage")
                .await
                .ok()
                .flatten()
                .unwrap_or_default(),
        );
    }
    if stages != ["admitted", "debited", "credited", "completed"] {
        return Err(format!("lineage shown: {stages:?}"));
    }
    let (_, payment) = get(&c, &format!("{base}/api/v1/payments/ui-payment-1")).await;
    if payment["amount"] != 1_250 {
        return Err(format!("12.50 was submitted as {}", payment["amount"]));
    }
    let by = &payment["submitted_by"];
    let expected = format!(
        "{} from {}",
        by["principal"].as_str().unwrap_or("?"),
        by["source"].as_str().unwrap_or("?")
    );
    let submitter = text(client, "#payment-view-submitter").await;
    if submitter != expected || !submitter.contains(" from 127.0.0.1:") {
        return Err(format!(
            "submitted by shown as {submitter:?}, the API says {by}"
        ));
    }
    screenshot(client, "payment-lineage.png").await;

    // A dead letter replayed from the UI leaves the list: a deposit to an
    // account that did not exist yet, replayed once it does.
    let deposit = Event::Deposit {
        account: "late-account".into(),
        amount_cents: 500,
        at_ms: now_ms(),
    };
    let bytes = codec::encode(&Envelope::new(None, deposit));
    let inject = json!({"topic": "payment.inflight",
        "records": [{"key": "late-account", "value_hex": kpay::ops::dlq::hex(&bytes)}]});
    let (status, _) = post(&c, &format!("{base}/api/v1/ops/records"), inject).await;
    if status != 201 {
        return Err(format!("inject answered {status}"));
    }
    eventually("dead letter listed", seconds(15), || async {
        client
            .find_all(Locator::Css("#dlq-table tbody tr[data-id]"))
            .await
            .is_ok_and(|rows| rows.len() == 1)
    })
    .await?;
    screenshot(client, "dlq.png").await;
    let open = json!({"id": "late-account", "opening_balance": 0});
    post(&c, &format!("{base}/api/v1/accounts"), open).await;
    click(client, "#dlq-table tbody tr[data-id] button.btn-replay").await?;
    eventually("dead letter cleared", seconds(15), || async {
        client
            .find_all(Locator::Css("#dlq-table tbody tr[data-id]"))
            .await
            .is_ok_and(|rows| rows.is_empty())
    })
    .await?;
    eventually("deposit landed", seconds(10), || async {
        get(&c, &format!("{base}/api/v1/accounts/late-account"))
            .await
            .1["balance"]
            == 500
    })
    .await?;

    audit_panel(client, &c, &base).await?;

    let errors = page_errors(client).await;
    if !errors.is_empty() {
        return Err(format!("console errors on the dashboard: {errors:?}"));
    }

    // Phone width: panels stack, nothing wider than the screen.
    client
        .set_window_size(375, 800)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let overflow = client
        .execute(
            "return document.documentElement.scrollWidth - window.innerWidth;",
            vec![],
        )
        .await
        .map_err(|e| e.to_string())?;
    screenshot(client, "dashboard-phone.png").await;
    if overflow.as_i64().unwrap_or(1) > 0 {
        return Err(format!("page is {overflow} px wider than a phone screen"));
    }
    client
        .set_window_size(1280, 800)
        .await
        .map_err(|e| e.to_string())?;

    // Swagger UI: try one call for real.
    client
        .goto(&format!("{base}/swagger-ui/"))
        .await
        .map_err(|e| e.to_string())?;
    let operation = "#operations-control-status";
    eventually("swagger ui loaded", seconds(15), || async {
        client.find(Locator::Css(operation)).await.is_ok()
    })
    .await?;
    click(client, &format!("{operation} .opblock-summary")).await?;
    eventually("try it out", seconds(10), || async {
        click(client, &format!("{operation} .try-out__btn"))
            .await
            .is_ok()
    })
    .await?;
    eventually("execute", seconds(10), || async {
        click(client, &format!("{operation} .execute"))
            .await
            .is_ok()
    })
    .await?;
    // The server's answer, as Swagger UI shows it under "Server response".
    let answered = format!(
        "return Array.from(document.querySelectorAll('{operation} .live-responses-table \
         .response-col_status')).map(e => e.textContent).join(' ');"
    );
    let shown = || async {
        let value = client.execute(&answered, vec![]).await;
        value
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    let waited = eventually("swagger call answered 200", seconds(10), || async {
        shown().await.contains("200")
    })
    .await;
    if let Err(error) = waited {
        return Err(format!("{error} (status shown: {:?})", shown().await));
    }
    screenshot(client, "swagger-try-it-out.png").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screening_in_a_real_browser() {
    if !chromium_present() {
        let why = format!(
            "{CHROMIUM} or {CHROMEDRIVER} not found (apt-get install chromium chromium-driver)"
        );
        skip_or_fail_in_ci("screening_in_a_real_browser", &why);
        return;
    }
    // Adaptive intake on, so its rate shows in the control panel too.
    let (server, _) = TestServer::builder()
        .config(|c| {
            c.control.adaptive = true;
            c.control.adaptive_interval_ms = 200;
        })
        .accounts(&[("payer", 1_000_000), ("payee", 0)])
        .start()
        .await;
    let driver = Driver::start().await;
    let client = browser(&driver).await;
    let result = screening_steps(&client, &server).await;
    if let Err(failure) = &result {
        screenshot(&client, "screening-failure.png").await;
        let errors = page_errors(&client).await;
        let _ = client.close().await;
        panic!("{failure}\npage errors: {errors:?}");
    }
    let _ = client.close().await;
    server.stop().await;
}

/// The rules set from the panel, a held payment shown with its value in
/// the business panel, then approved and another declined from the list;
/// the adaptive intake's rate and reason in the control panel.
async fn screening_steps(client: &Client, server: &TestServer) -> Result<(), String> {
    let (c, base) = (reqwest::Client::new(), server.base.clone());
    let seconds = Duration::from_secs;
    client.goto(&base).await.map_err(|e| e.to_string())?;
    eventually("rules shown", seconds(10), || async {
        text(client, "#screening-source").await.contains("all off")
    })
    .await?;
    fill(client, "#scr-review", "200.00").await?;
    fill(client, "#scr-blocked", "acct-x, acct-y").await?;
    click(client, "#btn-screening").await?;
    let rules = || async { get(&c, &format!("{base}/api/v1/screening/rules")).await.1 };
    eventually("rules applied", seconds(10), || async {
        rules().await["rules"]["review_above"] == json!(20_000)
    })
    .await?;
    let set = rules().await;
    if set["rules"]["blocked_accounts"] != json!(["acct-x", "acct-y"])
        || set["rules"]["max_amount"] != Value::Null
    {
        return Err(format!("rules set from the panel: {set}"));
    }
    for id in ["big-1", "big-2"] {
        let body = json!({"id": id, "from": "payer", "to": "payee", "amount": 25_000});
        let (status, answer) = post(&c, &format!("{base}/api/v1/payments"), body).await;
        if status != 202 {
            return Err(format!("submit {id}: {status} {answer}"));
        }
    }
    eventually("two held rows", seconds(10), || async {
        client
            .find_all(Locator::Css("#held-list li[data-id]"))
            .await
            .is_ok_and(|rows| rows.len() == 2)
    })
    .await?;
    eventually(
        "held counted in the business panel",
        seconds(10),
        || async { number(client, "#m-held-count").await == Some(2.0) },
    )
    .await?;
    screenshot(client, "screening-held.png").await;
    click(
        client,
        "#held-list li[data-id='big-1'] button[data-verdict='approve']",
    )
    .await?;
    click(
        client,
        "#held-list li[data-id='big-2'] button[data-verdict='decline']",
    )
    .await?;
    let status_of = |id: &'static str| {
        let (c, base) = (c.clone(), base.clone());
        async move { get(&c, &format!("{base}/api/v1/payments/{id}")).await.1 }
    };
    eventually("approved and declined", seconds(10), || async {
        status_of("big-1").await["status"] == "confirmed"
            && status_of("big-2").await["reason"] == "declined"
    })
    .await?;
    eventually("held list empty", seconds(10), || async {
        text(client, "#held-empty").await.contains("None")
    })
    .await?;
    // Submit pressed twice (two submit events, the second before the first
    // is answered): one payment, the form's Idempotency-Key makes it so.
    fill(client, "#pay-id", "").await?;
    fill(client, "#pay-from", "payer").await?;
    fill(client, "#pay-to", "payee").await?;
    fill(client, "#pay-amount", "1.23").await?;
    let twice =
        "const f = document.getElementById('pay-form'); f.requestSubmit(); f.requestSubmit();";
    client
        .execute(twice, vec![])
        .await
        .map_err(|e| e.to_string())?;
    eventually("the payment answered", seconds(10), || async {
        text(client, "#pay-result").await.contains("Accepted")
    })
    .await?;
    let payments = || async {
        get(&c, &format!("{base}/api/v1/payments?limit=100"))
            .await
            .1
    };
    eventually("one payment of 1.23 confirmed", seconds(10), || async {
        let list = payments().await;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let ours: Vec<&Value> = items.iter().filter(|p| p["amount"] == 123).collect();
        ours.len() == 1 && ours[0]["status"] == "confirmed"
    })
    .await?;
    tokio::time::sleep(seconds(1)).await;
    let list = payments().await;
    let count = (list["items"].as_array().unwrap().iter())
        .filter(|p| p["amount"] == 123)
        .count();
    let (_, payee) = get(&c, &format!("{base}/api/v1/accounts/payee")).await;
    if count != 1 || payee["balance"] != json!(25_000 + 123) {
        return Err(format!("a double submit paid {count} times: {payee}"));
    }
    // The adaptive rate in force, as the control status says it.
    eventually("adaptive rate shown", seconds(10), || async {
        let shown = number(client, "#rate-adaptive-value").await;
        let (_, status) = get(&c, &format!("{base}/api/v1/control/status")).await;
        let in_force = status["rate_in_force"].as_f64();
        shown.is_some()
            && shown == in_force
            && !text(client, "#rate-adaptive-reason").await.is_empty()
    })
    .await?;
    let errors = page_errors(client).await;
    if !errors.is_empty() {
        return Err(format!("page errors: {errors:?}"));
    }
    Ok(())
}
