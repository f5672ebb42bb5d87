"""The lesson page in a real browser (Debian's Chromium through Playwright), against a real server.

Each test also takes a screenshot of its page; with NNVITALS_SCREENSHOTS=1 they land in docs/images/web/ for
the README.
"""

from __future__ import annotations

import io
import json
import re
import time
from urllib.request import Request, urlopen

import pytest
from pypdf import PdfReader

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture then skips these tests, or fails them under CI=true
    expect = None

from nnvitals.study import store
from nnvitals.study.material import packaged

from .conftest import fake_lab, fake_run, serving

pytestmark = pytest.mark.usefixtures("browser")


def test_an_answer_stays_closed_until_opened(page, live_server, screenshot):
    page.goto(live_server.url + "/")
    first = page.locator(".question").first
    answer = first.locator("details.answer p")
    expect(answer).to_be_hidden()
    first.locator("textarea").fill("the logits are too big at the start")
    first.get_by_text("Show the answer").click()
    expect(answer).to_be_visible()
    expect(answer).to_contain_text("3.30")  # ln 27, filled in from the numbers module
    expect(first.locator("textarea")).to_have_value("the logits are too big at the start")
    expect(page.locator(".question details[open]")).to_have_count(1)  # the others stay closed
    screenshot(page, "lesson")


def test_a_card_turns_over_with_the_mouse_and_with_the_keyboard(page, live_server, screenshot):
    page.goto(live_server.url + "/flashcards")
    lesson = packaged()
    cards = page.locator(".card")
    expect(cards).to_have_count(8)
    first, second = cards.nth(0), cards.nth(1)
    expect(first.locator(".front")).to_contain_text(lesson.cards[0].question)
    expect(first.locator(".back")).to_be_hidden()

    first.click()
    expect(first.locator(".back")).to_be_visible()
    expect(first.locator(".back")).to_contain_text(lesson.cards[0].answer[:40])
    expect(first.locator(".front")).to_be_hidden()
    expect(first).to_have_attribute("aria-pressed", "true")

    second.focus()
    page.keyboard.press("Enter")
    expect(second.locator(".back")).to_be_visible()
    page.keyboard.press(" ")  # and back again
    expect(second.locator(".front")).to_be_visible()
    expect(second.locator(".back")).to_be_hidden()
    page.keyboard.press("Tab")  # the next card is reachable from the keyboard too
    page.keyboard.press(" ")
    expect(cards.nth(2).locator(".back")).to_be_visible()
    cards.nth(2).click()  # leave one card turned for the picture
    screenshot(page, "flashcards")


def test_print_flashcards_gives_exactly_eight_pages(page, live_server, screenshot):
    page.goto(live_server.url + "/flashcards")
    with page.expect_popup() as popup:
        page.get_by_text("Print flashcards").click()
    assert popup.value.url.startswith(live_server.url + "/flashcards/print")
    popup.value.close()

    page.goto(live_server.url + "/flashcards/print")
    screenshot(page, "print")
    pdf = PdfReader(io.BytesIO(page.pdf(prefer_css_page_size=True)))
    assert len(pdf.pages) == 8
    width, height = float(pdf.pages[0].mediabox.width), float(pdf.pages[0].mediabox.height)
    assert (round(width), round(height)) == (595, 420)  # A5 landscape, in points, from the CSS @page
    for number, (sheet, card) in enumerate(zip(pdf.pages, packaged().cards, strict=True), 1):
        text = " ".join(sheet.extract_text().split())
        assert f"card {number} of 8" in text.lower()
        assert " ".join(card.question.split()[:5]) in text  # each page holds its own card
        assert "Print" not in text  # the on-screen toolbar is not printed


def test_calculators_and_a_case_checked_by_the_server(page, live_server, screenshot):
    page.goto(live_server.url + "/exercise")
    baseline = page.locator("#calc-baseline")
    baseline.locator("input[name=classes]").fill("50")
    baseline.get_by_role("button").click()
    expect(baseline.locator(".result")).to_contain_text("3.9120 nats")

    verdict = page.locator("#calc-verdict")
    verdict.get_by_role("button").click()  # 27 classes, 13.5 nats: the lesson's first case
    expect(verdict.locator(".result")).to_contain_text("too-high")
    verdict.locator("input[name=classes]").fill("many")
    verdict.get_by_role("button").click()
    expect(verdict.locator(".result")).to_contain_text("classes:")
    expect(verdict.locator("input[name=classes]")).to_have_attribute("aria-invalid", "true")

    tanh = page.locator("#calc-tanh")
    tanh.locator("input[name=x]").fill("-3")
    tanh.get_by_role("button").click()
    expect(tanh.locator(".result")).to_contain_text("tanh(-3) = -0.9951")
    expect(tanh.locator(".result")).to_contain_text("1.0% of its gradient")

    case = page.locator("#cases .case").nth(2)  # the tanh unit at x = 2
    inputs = case.locator("input[name=answer]")
    inputs.nth(0).fill("0.964")
    inputs.nth(1).fill("50%")
    case.get_by_role("button", name="Check my figures").click()
    expect(case.locator(".mark").nth(0)).to_have_text("right: 0.9640")
    expect(case.locator(".mark").nth(1)).to_contain_text("not within ±0.005 of 0.0707")
    expect(case.locator(".worked")).to_be_visible()
    expect(case.locator(".verdict")).to_contain_text("passes back 7.1% of its gradient")

    page.get_by_role("button", name="New case").click()
    drill = page.locator("#drills .case")
    expect(drill).to_have_count(1)
    expect(drill.locator(".story")).not_to_be_empty()
    drill.get_by_role("button", name="Check my figures").click()  # nothing typed: each figure is shown
    expect(drill.locator(".mark").first).to_contain_text("skipped: it is")
    case.scroll_into_view_if_needed()
    screenshot(page, "exercise")


def test_a_grade_persists_across_a_reload_and_shows_in_the_cli(page, live_server, run_cli, screenshot):
    page.goto(live_server.url + "/review")
    counts = page.locator("#counts")
    expect(counts).to_contain_text("0 due · 8 new · 8 cards · 0 grades so far")
    expect(page.locator("#card-question")).to_have_text(packaged().cards[0].question)
    page.get_by_role("button", name="Show the answer").click()
    expect(page.locator("#card-answer-text")).to_be_visible()
    page.get_by_role("button", name="Good").click()
    expect(page.locator("#review-last")).to_contain_text("Good on card-baseline: back in 10 min")
    expect(counts).to_contain_text("7 new")

    page.reload()
    expect(counts).to_contain_text("0 due · 7 new · 8 cards · 1 grade so far")
    expect(page.locator("#card-question")).to_have_text(packaged().cards[1].question)
    page.keyboard.press(" ")  # the keyboard works as in the terminal: Space shows, 1-4 grade
    expect(page.locator("#card-answer-text")).to_be_visible()
    screenshot(page, "review")

    code, out, err = run_cli("study", "stats", "--db", str(live_server.db), "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["reviews"] == 1 and stats["new"] == 7 and stats["learning"] == 1
    first = next(s for s in stats["schedules"] if s["card_id"] == "card-baseline")
    assert first["reviews"] == 1 and first["state"] == "learning"


def test_a_double_click_grades_once(page, live_server):
    before = store.stats(live_server.db).reviews
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto(live_server.url + "/review")
    question = page.locator("#card-question").inner_text()
    page.get_by_role("button", name="Show the answer").click()
    page.get_by_role("button", name="Good").dblclick()
    expect(page.locator("#review-last")).to_contain_text("Good on")
    expect(page.locator("#card-question")).not_to_have_text(question)
    page.wait_for_timeout(300)  # time for a second grade to arrive, were one sent
    assert len(posts) == 1
    assert store.stats(live_server.db).reviews == before + 1
    expect(page.locator(".grade-3")).to_be_enabled()  # ready for the next card


def test_counts_take_thousands_separators_and_a_failed_new_case_says_so(page, live_server):
    page.goto(live_server.url + "/exercise")
    baseline = page.locator("#calc-baseline")
    baseline.locator("input[name=classes]").fill("1,000")
    baseline.get_by_role("button").click()
    expect(baseline.locator(".result")).to_contain_text("6.9078 nats")
    page.route("**/api/exercise/drill*", lambda route: route.abort())
    page.get_by_role("button", name="New case").click()
    expect(page.locator("#drill-error")).to_contain_text("No new case: the server cannot be reached")
    expect(page.locator("#drills .case")).to_have_count(0)


def test_a_quick_lab_run_started_from_the_page(page, live_server, screenshot):
    page.goto(live_server.url + "/lab")
    expect(page.locator("#runs")).to_contain_text("No lab runs")
    for box in page.locator("input[name=stage]").all():
        if box.get_attribute("value") != "naive":  # one stage: a second one costs a worker process
            box.uncheck()
    page.locator("input[name=steps]").fill("300")
    page.get_by_role("button", name="Run quick experiment").click()
    state = page.locator("#job-state")
    expect(state).to_contain_text(re.compile(r"Running|Finished"))
    run_id = re.search(r"\d{8}-\d{6}-lab\S*", state.inner_text()).group(0).rstrip(":")

    page.reload()  # the run goes on, and the page finds it again
    expect(state).to_contain_text(run_id)
    expect(page.locator("#job-stages tr")).to_have_count(1)
    expect(state).to_contain_text("Finished", timeout=90_000)
    expect(page.locator("#job-stages tr.done")).to_contain_text("300 / 300 steps")

    summary = json.loads(urlopen(f"{live_server.url}/api/runs/{run_id}").read())  # the JSON API agrees
    assert summary == json.loads((live_server.runs / run_id / "summary.json").read_text())
    assert summary["stages"][0]["name"] == "naive" and summary["stages"][0]["steps"] == 300
    with urlopen(f"{live_server.url}/lab/runs/{run_id}/report.html") as served:  # scripts could not run in it
        assert "default-src 'none'" in served.headers["Content-Security-Policy"]

    listed = page.locator(f'article.run[data-run-id="{run_id}"]')
    expect(listed.locator("table.results tbody tr")).to_have_count(1)
    expect(listed.locator("table.results")).to_contain_text("too-high")  # the naive stage's start
    screenshot(page, "lab")

    page.get_by_role("link", name="Open the report").first.click()
    expect(page).to_have_url(f"{live_server.url}/lab/runs/{run_id}")
    report = page.frame_locator("iframe.report")
    expect(report.locator("h1")).to_contain_text("makemore part 3")
    expect(report.locator("h2#naive")).to_be_visible()
    expect(report.locator("img").first).to_be_visible()
    frame = page.frame(url=re.compile(r"report\.html$"))
    assert frame is not None
    # The loss curve, and three pictures before training and three after, every one decoded (waited for:
    # a large report is still arriving when its first picture shows).
    frame.wait_for_function("document.readyState === 'complete' && document.images.length >= 1 + 2 * 3 "
                            "&& [...document.images].every((i) => i.complete && i.naturalWidth > 100)")
    screenshot(page, "run")


@pytest.fixture(scope="module")
def fake_lab_server(tmp_path_factory):
    """The page with a stand-in for the lab that finishes a run when the test puts a file `go` in the runs folder."""
    root = tmp_path_factory.mktemp("fake-lab")
    with serving(root, lab_command=fake_lab(root)) as server:
        yield server


def post_json(url, body):
    request = Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urlopen(request) as answer:
        return json.loads(answer.read())


def job_state(server):
    return json.loads(urlopen(f"{server.url}/api/lab/job").read())


def test_the_list_follows_a_run_that_ends_before_the_page_first_asks(page, fake_lab_server):
    server = fake_lab_server
    run_id = post_json(f"{server.url}/api/lab/job", {"stages": ["naive"]})["run_id"]
    deadline = time.monotonic() + 15
    while not (server.runs / run_id / "pids").is_file():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page.goto(server.url + "/lab")
    listed = page.locator(f'article.run[data-run-id="{run_id}"]')
    expect(listed).to_contain_text("Running now")  # not `nnvitals lab --resume` for the page's own run
    expect(listed).not_to_contain_text("--resume")

    def finish_first(route):  # the run ends after the page is rendered and before its first question
        (server.runs / "go").touch()
        while job_state(server)["state"] != "finished":
            time.sleep(0.05)
        route.continue_()

    page.route("**/api/lab/job", finish_first)
    page.reload()
    expect(page.locator("#job-state")).to_contain_text("Finished")
    expect(listed.get_by_role("link", name="Open the report")).to_be_visible()
    expect(listed).not_to_contain_text("Running now")
    page.unroute("**/api/lab/job")

    page.route("**/lab/runs", lambda route: route.fulfill(status=500, body="broken"))
    page.get_by_role("button", name="Run quick experiment").click()
    expect(page.locator("#runs-error")).to_contain_text("could not be refreshed (the server answered 500)")


def test_a_form_in_a_report_cannot_use_the_api(page, fake_lab_server):
    server = fake_lab_server
    fake_run(server.runs, "injected", report='<form method="post" action="/api/lab/job"><button>Go</button></form>')
    before = job_state(server)["run_id"]
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto(server.url + "/lab/runs/injected")
    page.frame_locator("iframe.report").get_by_role("button", name="Go").click()
    page.wait_for_timeout(300)
    assert posts == [] and job_state(server)["run_id"] == before
