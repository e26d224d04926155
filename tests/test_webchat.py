"""The chat web page at GET /, driven in headless Chromium (Debian's chromium + chromium-driver,
through selenium) against the server in a thread with a small random-init model. Browser tests skip
where the browser, its driver or selenium is missing; .ci/run installs them."""
from __future__ import annotations

import itertools
import shutil
import time

import httpx
import pytest

from tests.helpers import make_chat_model, serving, slow_engine_steps, wait_pool_empty

KEY = "web-key"
CONTEXT = 2048
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,900")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # weights larger than the default init: the greedy answer then depends on the prompt, so an answer
    # that matches the reference shows which messages the page sent
    return make_chat_model(tmp_path_factory.mktemp("webchat-model"), n_positions=CONTEXT, initializer_range=0.2)


@pytest.fixture(scope="module")
def srv(torch_path, model_dir):
    with serving(model_dir, api_key=KEY, max_num_seqs=4) as server:
        yield server


@pytest.fixture
def slow_steps(srv):
    """Engine steps of >= 20 ms, counted: a long answer then streams for many seconds, so the page
    is still receiving it when the test presses stop, and the count shows where generation ended."""
    with slow_engine_steps(srv) as calls:
        yield calls


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # both paths given: selenium never looks for (or downloads) a browser of its own
    d = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    d.set_page_load_timeout(30)
    yield d
    d.quit()


class Page:
    """The chat page in the browser: fill the settings, send, read the last assistant turn."""

    def __init__(self, driver, url):
        self.d = driver
        driver.get(url + "/")

    def el(self, id_):
        return self.d.find_element("id", id_)

    def fill(self, id_, value):
        el = self.el(id_)
        el.clear()
        el.send_keys(value)

    def settings(self, key=KEY, system="", temperature="0", top_p="1", max_tokens="", extra=""):
        for id_, v in (("api-key", key), ("system", system), ("temperature", temperature), ("top-p", top_p),
                       ("max-tokens", max_tokens), ("extra", extra)):
            self.fill(id_, v)

    def send(self, text):
        self.fill("input", text)
        self.el("send").click()

    def wait(self, cond, what, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def js(self, script):
        return self.d.execute_script(script)

    def turns(self):
        return self.js("return [...document.querySelectorAll('.turn.assistant')].map(t => ({"
                       "answer: t.querySelector('.answer').textContent,"
                       "stats: t.querySelector('.stats').textContent,"
                       "error: (t.querySelector('.error') || {}).textContent || ''}))")

    def last(self):
        return self.turns()[-1]

    def done(self, n):
        """The n-th answer (1-based) once it has its stats or an error."""
        return self.wait(lambda: len(ts := self.turns()) >= n and (ts[n - 1]["stats"] or ts[n - 1]["error"])
                         and ts[n - 1], f"answer {n} to finish")

    def buttons(self):
        return self.el("send").is_enabled(), self.el("stop").is_enabled()


def reference_answer(srv, messages, **fields):
    r = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"messages": messages, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens"]


def stats_fields(stats):
    """'12 tokens · 40.1 tokens/s · first token 0.05 s · prompt 9 tokens' -> (12, 40.1, 9)"""
    parts = stats.split(" · ")
    prompt = [int(p.split()[1]) for p in parts if p.startswith("prompt ")]
    return int(parts[0].split()[0].lstrip("~")), float(parts[1].split()[0]), prompt[0] if prompt else None


# ------------------------------------------------------------------- without a browser

def test_page_is_public_and_self_contained(srv):
    r = httpx.get(srv.url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert 'id="send"' in html and 'id="stop"' in html and "v1/chat/completions" in html
    # no CDN: nothing is fetched from another origin
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    # the page is public; the API behind it still asks for the key
    assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 401


# ------------------------------------------------------------------- in the browser

def test_streams_answers_with_history_and_tokens_per_second(srv, driver):
    page = Page(driver, srv.url)
    page.settings(system="be brief", max_tokens="12", extra='{"ignore_eos": true}')
    page.send("hello server")
    first = page.done(1)
    assert not first["error"]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello server"}]
    answer, prompt_tokens = reference_answer(srv, msgs, max_tokens=12, ignore_eos=True)
    assert first["answer"] == answer
    n, rate, shown_prompt = stats_fields(first["stats"])
    assert (n, shown_prompt) == (12, prompt_tokens) and rate > 0 and "tokens/s" in first["stats"]
    assert page.buttons() == (True, False)
    assert page.el("input").get_attribute("value") == ""
    # the second turn, sent with Enter, carries the whole conversation: its answer is the one for all
    # four messages
    page.fill("input", "and again\n")
    second = page.done(2)
    msgs += [{"role": "assistant", "content": first["answer"]}, {"role": "user", "content": "and again"}]
    answer, prompt_tokens = reference_answer(srv, msgs, max_tokens=12, ignore_eos=True)
    assert second["answer"] == answer and stats_fields(second["stats"])[2] == prompt_tokens


def test_stop_ends_a_long_answer(srv, driver, slow_steps):
    page = Page(driver, srv.url)
    max_tokens = 1000
    page.settings(max_tokens=str(max_tokens), extra='{"ignore_eos": true}')
    page.send("the quick brown fox")
    # streamed: the answer is seen growing while send is disabled
    n0 = page.wait(lambda: len(page.last()["answer"]), "the answer to start")
    page.wait(lambda: len(page.last()["answer"]) > n0, "the answer to grow")
    assert page.buttons() == (False, True), page.last()
    page.el("stop").click()
    page.wait(lambda: page.buttons() == (True, False), "send to be enabled again")
    stopped = page.last()
    assert "stopped" in stopped["stats"] and not stopped["error"]
    n_tokens, _, prompt_tokens = stats_fields(stopped["stats"])
    assert 0 < n_tokens < max_tokens and prompt_tokens is None  # no usage chunk: the stream was cut
    # the request is aborted on the server too, long before its max_tokens, and the answer no longer grows
    wait_pool_empty(srv)
    assert len(slow_steps) < max_tokens // 2
    assert page.last()["answer"] == stopped["answer"]


def test_wrong_key_shows_the_401_message(srv, driver):
    page = Page(driver, srv.url)
    page.settings(key="not-the-key", max_tokens="4")
    page.send("hi there")
    err = page.done(1)["error"]
    assert "401" in err and "Incorrect or missing API key" in err and "invalid_api_key" in err
    # the message goes back into the box, to send again once the key is fixed
    assert page.el("input").get_attribute("value") == "hi there"
    assert page.buttons() == (True, False)
    page.fill("api-key", KEY)
    page.el("send").click()
    fixed = page.done(2)
    assert not fixed["error"] and fixed["stats"]


def test_refused_settings_show_the_400_message(srv, driver):
    page = Page(driver, srv.url)
    page.settings(top_p="5", max_tokens="4")
    page.send("hi")
    err = page.done(1)["error"]
    assert err.startswith("HTTP 400") and "top_p" in err
    page.settings(extra="{not json")
    page.send("hi")
    assert "not JSON" in page.done(2)["error"]


def test_missing_chat_template_is_shown(torch_path, model_dir, driver):
    with serving(model_dir, template=False, max_num_seqs=4) as server:
        page = Page(driver, server.url)
        page.settings(key="", max_tokens="4")
        page.send("hi")
        err = page.done(1)["error"]
    assert "HTTP 400" in err and "chat_template_missing" in err


def test_engine_failure_mid_answer_is_shown(torch_path, model_dir, driver):
    with serving(model_dir, max_num_seqs=4) as server:
        step, calls = server.engine.llm.step, itertools.count()

        def dying_step():  # the engine loop dies a few tokens into the answer
            if next(calls) == 5:
                raise RuntimeError("boom")
            return step()
        server.engine.llm.step = dying_step
        page = Page(driver, server.url)
        page.settings(key="", max_tokens="100", extra='{"ignore_eos": true}')
        page.send("hi")
        turn = page.done(1)
    assert "the server stopped the answer" in turn["error"] and "boom" in turn["error"]
    assert page.buttons() == (True, False)
