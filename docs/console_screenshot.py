"""Take docs/console.png: the console's Playground comparing two routes, in a real browser.

    python docs/console_screenshot.py [OUT.png]

Starts two fake upstreams and a gateway on 127.0.0.1 (temporary directory), signs in
with Debian's chromium through Playwright, sends one prompt to two models side by side
and saves a screenshot. Needs `pip install -e '.[dev]'` and /usr/bin/chromium.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import openai
from playwright.sync_api import expect, sync_playwright

from asgi_llm.testing.processes import fake_upstream, gateway_process

ADMIN = "sk-admin-screenshot-0123456789"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp, fake_upstream("provider-a", models=["gpt-4o-mini"]) as a, \
            fake_upstream("provider-b", models=["llama-3.1-8b"]) as b:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(f"""\
providers:
  provider-a: {{base_url: "{a.base_url}"}}
  provider-b: {{base_url: "{b.base_url}"}}
models:
  chat: {{targets: [{{provider: provider-a, model: gpt-4o-mini, price: {{input: 0.15, output: 0.60}}}}]}}
  chat-b: {{targets: [{{provider: provider-b, model: llama-3.1-8b, price: {{input: 0.05, output: 0.08}}}}]}}
auth:
  admin_keys: ["{ADMIN}"]
  keys: [{{key: sk-team-a-screenshot, org: team-a}}]
stores: {{ledger: "sqlite:///{Path(tmp) / 'gw.db'}"}}
console: {{enabled: true, path: /console}}
""")
        with gateway_process(recipe) as gw:
            with openai.OpenAI(base_url=gw.base_url, api_key="sk-team-a-screenshot", max_retries=0) as client:
                for model in ("chat", "chat-b", "chat"):
                    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "warm up"}])
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                page.goto(gw.url + "/console")
                page.get_by_label("Admin key").fill(ADMIN)
                page.get_by_role("button", name="Sign in").click()
                page.get_by_label("Viewing org").select_option("team-a")
                page.get_by_role("link", name="Playground", exact=True).click()
                page.get_by_label("Model", exact=True).select_option("chat")
                page.get_by_role("button", name="Add model").click()
                page.get_by_label("Model 2", exact=True).select_option("chat-b")
                page.get_by_label("Message").fill("Explain what an LLM gateway does in one sentence.")
                page.get_by_role("button", name="Send").click()
                for i in range(2):
                    expect(page.locator(".column").nth(i).locator(".m-cost")).to_contain_text("$", timeout=15000)
                page.screenshot(path=str(out), full_page=True)
                browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("console.png"))
