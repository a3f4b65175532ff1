"""Render the alert email railwatch would send for an alert of a store, to .eml and to PNG.

Builds the message with railwatch's own email builder (the path deliveries take), then renders its
HTML part, with the inline chart, in headless Chromium. Used to make docs/img/alert-email.png:

    railwatch demo
    .venv/bin/python docs/tools/render_alert_email.py demo-output/railwatch.db docs/img/alert-email.png
"""

from __future__ import annotations

import base64
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from html import escape
from pathlib import Path

from railwatch.alerts.email import build_message
from railwatch.alerts.payload import Delivery, event_payload
from railwatch.alerts.subscribers import EmailSubscriber
from railwatch.aoi import load_aoi
from railwatch.report import activity_chart
from railwatch.store import Store


def main(db: str, out_png: str, aoi_dir: str = "aoi") -> None:
    store = Store(f"sqlite:///{Path(db).resolve()}")
    alert = store.alerts()[0]
    event = store.events(alert_id=alert.id)[0]  # alert.opened
    aoi, _ = load_aoi(Path(aoi_dir) / f"{alert.aoi_id}.geojson")
    key = "rwd_example"
    chart = activity_chart(f"{aoi.name} — estimated rail cars", store.observations(aoi.id), [alert])
    payload = event_payload(delivery_key=key, event=event, alert=alert, aoi=aoi)
    sub = EmailSubscriber.model_validate({"name": "desk", "kind": "email", "to": ["desk@example.org"],
                                          "from": "railwatch <railwatch@example.org>", "smtp_host": "localhost",
                                          "smtp_security": "none"})
    msg = build_message(sub, Delivery(key=key, subscriber="desk", event_type=event.type, payload=payload,
                                      alert_id=alert.id, chart_png=chart), now=datetime.now(UTC))
    out = Path(out_png)
    out.with_suffix(".eml").write_bytes(msg.as_bytes())
    parsed = BytesParser(policy=policy.default).parsebytes(msg.as_bytes())
    html = parsed.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    for part in parsed.walk():
        cid = part.get("Content-ID")
        if cid:
            data = base64.b64encode(part.get_payload(decode=True)).decode()
            html = html.replace(f"cid:{cid.strip('<>')}", f"data:image/png;base64,{data}")
    headers = "".join(f"<div><b>{h}:</b> {escape(str(parsed[h]))}</div>" for h in ("From", "To", "Subject", "Date"))
    page = f"<html><body style='font-family:sans-serif;margin:16px'>{headers}<hr>{html}</body></html>"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "mail.html"
        src.write_text(page, encoding="utf-8")
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp}/u",
                        f"--screenshot={out.resolve()}", "--window-size=1000,1250", src.as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
