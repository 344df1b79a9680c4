"""The chat page in a real browser (Debian's headless Chromium, driven by Playwright): type a
message, get the answer, click like, and find the row in SQLite with the answer the page shows
and the label (the click naming the answer's conversation); a message holding a <script> tag is shown as text and never runs.

Chromium comes from apt (`make setup` installs it when missing). Without it the test skips,
saying so, except on CI (CI=true), where it must run and fails instead."""
import json
import os
import shutil
import sqlite3
import threading

import pytest

from helpers import write_policy_run
from rlhf_jax.chat import model_choice as chat_model, server as serve
from rlhf_jax.text import tokenizer as tok_lib
from rlhf_jax.data import feedback

CHROMIUM = "/usr/bin/chromium"
# The network here is closed: these keep Chromium from trying to reach its services.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCRIPT_MESSAGE = "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\">"


def _need_browser():
  missing = []
  if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
    missing.append(f"{CHROMIUM} (apt-get install chromium)")
  try:
    import playwright.sync_api  # noqa: F401
  except ImportError:
    missing.append("the playwright package (pip install -e '.[test]')")
  if missing:
    reason = "the browser test needs " + " and ".join(missing)
    if os.environ.get("CI"):
      pytest.fail(reason + "; on CI it must run")
    pytest.skip(reason)


@pytest.fixture
def page_server(tmp_path, bundled_tokenizer):
  """The server on a free loopback port, a random tiny model behind it; (url, workdir)."""
  _need_browser()
  vocab = tok_lib.Tokenizer.load(bundled_tokenizer).vocab_size
  write_policy_run(str(tmp_path / "run"), bundled_tokenizer, vocab, step=5, steps=5, scale=0.3)
  workdir = str(tmp_path / "w")
  model = chat_model.load_chat_model(workdir, str(tmp_path / "run"),
                                     chat_model.Generation(max_new_tokens=8))
  store = feedback.FeedbackStore(feedback.default_path(workdir))
  httpd = serve.make_server(serve.ChatService(model, store), "127.0.0.1", 0)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}/", workdir
  httpd.shutdown()
  httpd.server_close()
  store.close()


@pytest.mark.slow
def test_chat_like_and_script_tag_in_chromium(page_server):
  from playwright.sync_api import sync_playwright
  url, workdir = page_server
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
      # CSP bypassed: the page's script alone must keep text from running as HTML (the
      # Content-Security-Policy the server sends, checked below, is a second line).
      page = browser.new_page(bypass_csp=True)
      response = page.goto(url)
      assert "script-src 'self'" in response.headers["content-security-policy"]
      page.fill("#message", "Hello! How are you today?")
      page.click("#send")
      answer = page.wait_for_selector(".answer[data-message-id]", timeout=120_000)
      shown = answer.query_selector(".text").text_content()
      message_id = int(answer.get_attribute("data-message-id"))
      with page.expect_request("**/api/feedback") as posted:
        answer.query_selector("button.like").click()
      like = json.loads(posted.value.post_data)  # checked against the store below
      page.wait_for_selector(".answer button.like[aria-pressed=true]", timeout=30_000)

      # The script tag, typed as a message: shown as the characters typed, never run.
      page.fill("#message", SCRIPT_MESSAGE)
      page.click("#send")
      page.locator(".answer").nth(1).wait_for(timeout=120_000)
      users = [e.text_content() for e in page.query_selector_all(".msg.user .text")]
      assert users == ["Hello! How are you today?", SCRIPT_MESSAGE]
      assert page.evaluate("window.__pwned") is None
      assert page.query_selector_all("#log script, #log img") == []
      second = page.query_selector_all(".answer")[1]
      second_id = int(second.get_attribute("data-message-id"))
      second_shown = second.query_selector(".text").text_content()

      # Chinese: the selector starts a new conversation in that language.
      page.select_option("#lang", "zh")
      assert page.query_selector_all(".msg") == []
      assert page.text_content("#send") == "发送"
    finally:
      browser.close()

  db = sqlite3.connect(feedback.default_path(workdir))
  rows = db.execute(
      "SELECT m.content, f.label, m.checkpoint_step, c.lang FROM feedback f "
      "JOIN messages m ON m.id = f.message_id JOIN conversations c ON c.id = m.conversation_id "
      "WHERE m.id = ?", (message_id,)).fetchall()
  assert rows == [(shown, "like", 5, "en")]
  # The click named the answer's conversation, which the server checks the answer is in.
  (conversation_id,) = db.execute("SELECT conversation_id FROM messages WHERE id = ?",
                                  (message_id,)).fetchone()
  assert (like["conversation_id"], like["message_id"], like["label"]) == (
      conversation_id, message_id, "like")
  # The page showed the stored texts, the question as typed.
  stored = dict(db.execute("SELECT id, content FROM messages").fetchall())
  assert stored[second_id] == second_shown
  assert SCRIPT_MESSAGE in stored.values()
  db.close()
