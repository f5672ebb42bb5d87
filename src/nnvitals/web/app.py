"""The lesson page: FastAPI routes for the pages and their JSON API.

A new face only: the calculators call nnvitals.numbers, the exercise poses and checks with
nnvitals.study.exercise, the texts come from the lesson file, grades go through nnvitals.study.store
into the same database as `nnvitals study review`, and the lab page shows what `nnvitals lab` wrote.
"""

from __future__ import annotations

import random
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

import nnvitals
from nnvitals import numbers
from nnvitals.study import exercise, store
from nnvitals.study.material import Case, Lesson, packaged
from nnvitals.web import runs
from nnvitals.web.guard import Guard

HERE = Path(__file__).parent
MAX_CLASSES = 10**9
MAX_MAGNITUDE = 1e6  # losses and pre-activations beyond this are typing mistakes, not lessons

# Scripts, styles and pictures come from this server only; lab reports embed their pictures as data: URLs.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
               "frame-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'self'")
# A report is a file in the runs folder, which anyone may have edited: sandboxed (an origin of its own, no
# scripts, no forms), so HTML slipped into it cannot use the API as the page.
REPORT_POLICY = ("sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'; "
                 "form-action 'none'; base-uri 'none'")


# --- the API's shapes ------------------------------------------------------------------------------------

class Baseline(BaseModel):
    classes: int
    baseline: float = Field(description="ln(V) nats: the loss of a uniform guess over V classes")
    text: str


class Verdict(BaseModel):
    classes: int
    loss: float
    baseline: float
    excess: float = Field(description="loss - ln(V), in nats")
    status: Literal["healthy", "too-high", "too-low"]
    message: str
    fix: str


class Tanh(BaseModel):
    preactivation: float
    output: float = Field(description="tanh(x)")
    local_derivative: float = Field(description="1 - tanh(x)^2")
    fraction_passed: float = Field(description="share of the incoming gradient passed back")
    text: str


class CaseInputs(BaseModel):
    """A diagnosis case by its inputs: one of the lesson's three or a drilled one."""

    kind: Literal["start-loss", "baseline", "tanh"]
    classes: int | None = Field(None, ge=2, le=MAX_CLASSES, description="V, for start-loss and baseline cases")
    loss: float | None = Field(None, ge=0, le=MAX_MAGNITUDE, allow_inf_nan=False,
                               description="starting loss in nats, for start-loss cases")
    preactivation: float | None = Field(None, ge=-MAX_MAGNITUDE, le=MAX_MAGNITUDE, allow_inf_nan=False,
                                        description="x, for tanh cases")

    @model_validator(mode="after")
    def _complete(self) -> CaseInputs:
        needed = {"start-loss": ("classes", "loss"), "baseline": ("classes",), "tanh": ("preactivation",)}
        missing = [name for name in needed[self.kind] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.kind} case needs {' and '.join(missing)}")
        return self

    def case(self, case_id: str = "page", story: str = "") -> Case:
        return Case(case_id, self.kind, story, classes=self.classes, loss=self.loss, preactivation=self.preactivation)


def _answer(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None  # skipped
    return exercise.parse_answer(text)  # its ValueError says what is accepted


Answer = Annotated[str | None, Field(max_length=40), AfterValidator(_answer)]


class CheckRequest(BaseModel):
    case: CaseInputs
    answers: list[Answer] = Field(max_length=4, description="the learner's figures in step order, as typed "
                                  "(3.30, 3,30, 7%); empty or null skips one")


class StepOut(BaseModel):
    prompt: str
    tolerance: float


class PosedCase(CaseInputs):
    story: str
    steps: list[StepOut]


class StepResult(StepOut):
    answer: float | None
    right: bool | None = Field(description="null when skipped")
    expected: float
    shown: str


class CheckResult(BaseModel):
    steps: list[StepResult]
    right: int
    solution: list[str]
    verdict: str


class CardOut(BaseModel):
    id: str
    question: str
    answer: str
    state: str
    reviews: int


class ReviewState(BaseModel):
    cards: int
    due: int = Field(description="cards seen before and due now")
    new: int = Field(description="cards never graded")
    reviews: int = Field(description="grades recorded in all")
    card: CardOut | None = Field(description="the next card to review: the most overdue, else the first new one")
    next_due: datetime | None = Field(description="when the next card is due, among those seen")
    db: str


class GradeRequest(BaseModel):
    card_id: str = Field(max_length=100)
    rating: int = Field(ge=1, le=4, strict=True, description="1 Again, 2 Hard, 3 Good, 4 Easy")

    @field_validator("card_id")
    @classmethod
    def _known(cls, value: str) -> str:
        ids = packaged().card_ids
        if value not in ids:
            raise ValueError(f"not one of the lesson's cards ({', '.join(ids)})")
        return value


class ReviewOut(BaseModel):
    id: int
    card_id: str
    rating: int
    rating_name: str
    due: datetime
    state: str


class Graded(BaseModel):
    review: ReviewOut
    queue: ReviewState


class JobRequest(BaseModel):
    stages: list[str] | None = Field(None, min_length=1, max_length=12,
                                     description="a subset of the lab's stages; all of them when absent")
    steps: int | None = Field(None, ge=1, le=runs.MAX_STEPS, strict=True,
                              description="steps per stage; the quick profile's 20,000 when absent")

    @field_validator("stages")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        names = runs.stage_names()
        unknown = [s for s in value if s not in names]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r}; the stages are {', '.join(names)}")
        return [s for s in names if s in value]  # the lesson's order, each once


class StageProgress(BaseModel):
    name: str
    state: Literal["waiting", "running", "done", "stopped"]
    step: int
    steps: int | None
    loss: float | None = Field(description="latest training loss while running; validation loss when done")


class JobStatus(BaseModel):
    state: Literal["idle", "running", "cancelling", "cancelled", "finished", "failed"]
    run_id: str | None
    stages: list[StageProgress]
    fraction: float
    message: str | None
    seconds: float


# --- the app -----------------------------------------------------------------------------------------------

def _field(error: Any) -> str:
    if error.get("type") == "json_invalid":
        return "body"  # its loc is the offset of the mistake
    parts = [str(p) for p in error.get("loc", ())]
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def _msg(error: Any) -> str:
    if error.get("type") == "json_invalid":
        where = error.get("loc", ("body", "?"))[-1]
        return f"not valid JSON ({error.get('ctx', {}).get('error', 'decode error')} at character {where})"
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def _when(t: float | None) -> str:
    try:
        return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else ""
    except (ValueError, OverflowError, OSError):  # a time no calendar holds
        return ""


def _review_state(db: Path, lesson: Lesson) -> ReviewState:
    now = datetime.now(UTC)
    summary = store.stats(db, lesson.card_ids, now)  # each card's schedule too: one look at the database
    due = sorted((s for s in summary.schedules if s.due is not None and s.due <= now), key=lambda s: s.due or now)
    new = [s for s in summary.schedules if s.state == "new"]
    card = None
    if due or new:
        schedule = (due + new)[0]  # the most overdue, else the first new one (as `nnvitals study review`)
        nxt = lesson.card(schedule.card_id)
        card = CardOut(id=nxt.id, question=nxt.question, answer=nxt.answer, state=schedule.state,
                       reviews=schedule.reviews)
    return ReviewState(cards=summary.cards, due=len(due), new=len(new), reviews=summary.reviews, card=card,
                       next_due=summary.next_due, db=str(db))


def create_app(runs_dir: str | Path = "runs", db_path: str | Path | None = None, *, host: str = "127.0.0.1",
               port: int = 8765, lab_data: str | Path | None = None,
               lab_command: Sequence[str] | None = None, lab_grace_s: float = runs.CANCEL_GRACE_S) -> FastAPI:
    """The lesson page for a server at `host`:`port`.

    runs_dir: the lab's runs folder (listed, and where new runs go); db_path: the review database
    (default: the one `nnvitals study review` uses); lab_data: the word list for runs started from the
    page (default: the lab's own choice); lab_command: the lab command line (default: `nnvitals lab` in
    this interpreter); lab_grace_s: how long a cancelled run may take to stop before it is killed.
    """
    lesson = packaged()
    runs_path = Path(runs_dir)
    db = Path(db_path) if db_path is not None else store.default_path()
    guard = Guard(host, port)
    runner = runs.LabRunner(runs_path, Path(lab_data) if lab_data is not None else None, lab_command,
                            lab_grace_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The stage names come from the lab's models module, which imports torch (seconds): load it now, in
        # the background, rather than on the first visit to the lab page.
        threading.Thread(target=runs.stage_names, daemon=True).start()
        yield
        runner.shutdown()

    app = FastAPI(
        title="nnvitals lesson page",
        version=nnvitals.__version__,
        description="The lesson behind the numbers: calculators, the diagnosis exercise, flashcard reviews "
                    "and lab runs. Bad input is answered 422 with the field named; requests that change "
                    "state must come from the page itself.",
        lifespan=lifespan,
        docs_url=None,  # the interactive pages load their scripts from a CDN; the schema is /openapi.json
        redoc_url=None,
    )

    env = Environment(loader=PackageLoader("nnvitals.web", "templates"), autoescape=select_autoescape(default=True))
    env.filters["nats"] = lambda x: f"{x:.4f}" if isinstance(x, float | int) else ""
    env.filters["pct"] = lambda x: f"{100 * x:.1f}%" if isinstance(x, float | int) else ""
    env.filters["when"] = _when
    templates = Jinja2Templates(env=env)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def protect(request: Request, call_next: Any) -> Response:
        problem = guard.host_problem(request.headers.get("host")) or guard.origin_problem(
            request.method, request.headers.get("host"), request.headers.get("origin"),
            request.headers.get("sec-fetch-site"))
        if problem:
            return JSONResponse({"detail": f"refused: {problem}"}, status_code=403)
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message = "; ".join(f"{_field(e)}: {_msg(e)}" for e in errors)
        detail = [{"loc": list(e.get("loc", ())), "field": _field(e), "msg": _msg(e),
                   "type": e.get("type")} for e in errors]
        return JSONResponse({"detail": jsonable_encoder(detail), "message": message}, status_code=422)

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"lesson": lesson, "page": name.removesuffix(".html"),
                                                          **context}, status_code=status_code)

    def listed() -> dict[str, Any]:
        return {"runs": runs.list_runs(runs_path, runner.running()), "runs_dir": runs_path}

    # --- pages ------------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def lesson_page(request: Request) -> HTMLResponse:
        return page(request, "lesson.html")

    @app.get("/exercise", response_class=HTMLResponse, include_in_schema=False)
    def exercise_page(request: Request) -> HTMLResponse:
        problems = [exercise.pose(c) for c in lesson.cases]
        return page(request, "exercise.html", problems=problems)

    @app.get("/flashcards", response_class=HTMLResponse, include_in_schema=False)
    def flashcards_page(request: Request) -> HTMLResponse:
        return page(request, "flashcards.html")

    @app.get("/flashcards/print", response_class=HTMLResponse, include_in_schema=False)
    def print_page(request: Request) -> HTMLResponse:
        return page(request, "print.html")

    @app.get("/review", response_class=HTMLResponse, include_in_schema=False)
    def review_page(request: Request) -> HTMLResponse:
        return page(request, "review.html", db=db, ratings=store.RATINGS)

    @app.get("/lab", response_class=HTMLResponse, include_in_schema=False)
    def lab_page(request: Request) -> HTMLResponse:
        return page(request, "lab.html", stages=runs.stage_names(), max_steps=runs.MAX_STEPS, **listed())

    @app.get("/lab/runs", response_class=HTMLResponse, include_in_schema=False)
    def runs_fragment(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(request, "_runs.html", listed())

    @app.get("/lab/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
    def run_page(request: Request, run_id: str) -> HTMLResponse:
        try:
            run = runs.describe(runs_path, run_id)
        except runs.UnknownRun:
            return page(request, "missing.html", 404, run_id=run_id, runs_dir=runs_path)
        return page(request, "run.html", run=run | {"running": run_id == runner.running()}, runs_dir=runs_path)

    @app.get("/lab/runs/{run_id}/report.html", include_in_schema=False)
    def run_report(run_id: str) -> FileResponse:
        try:
            path = runs.report_path(runs_path, run_id)
        except runs.UnknownRun:
            raise HTTPException(404, f"no lab report for {run_id!r} in {runs_path}") from None
        return FileResponse(path, media_type="text/html", headers={"Content-Security-Policy": REPORT_POLICY})

    # --- numbers ------------------------------------------------------------------------------------------

    @app.get("/api/numbers/baseline", response_model=Baseline, tags=["numbers"])
    def baseline(classes: Annotated[int, Query(ge=2, le=MAX_CLASSES, description="V, the number of classes")]
                 ) -> Baseline:
        """The loss of a uniform guess over V classes, ln(V): where an untrained model should start."""
        value = numbers.baseline_loss(classes)
        return Baseline(classes=classes, baseline=value,
                        text=f"{value:.4f} nats (uniform baseline -ln(1/{classes}) for {classes} classes)")

    @app.get("/api/numbers/verdict", response_model=Verdict, tags=["numbers"])
    def verdict(classes: Annotated[int, Query(ge=2, le=MAX_CLASSES, description="V, the number of classes")],
                loss: Annotated[float, Query(ge=0, le=MAX_MAGNITUDE, allow_inf_nan=False,
                                             description="the loss measured before training, in nats")]
                ) -> Verdict:
        """Judge a starting loss against the uniform baseline: healthy, too-high or too-low."""
        return Verdict.model_validate(numbers.judge_start_loss(loss, classes).to_dict())

    @app.get("/api/numbers/tanh", response_model=Tanh, tags=["numbers"])
    def tanh(x: Annotated[float, Query(ge=-MAX_MAGNITUDE, le=MAX_MAGNITUDE, allow_inf_nan=False,
                                       description="the pre-activation")]) -> Tanh:
        """What a tanh unit passes back: tanh(x) and its local derivative 1 - tanh(x)^2."""
        g = numbers.tanh_gradient(x)
        return Tanh(**g.to_dict(), text=f"tanh({x:g}) = {g.output:.4f}; 1 - tanh² = {g.local_derivative:.4f}, so "
                                        f"the unit passes back {100 * g.fraction_passed:.1f}% of its gradient")

    # --- exercise -----------------------------------------------------------------------------------------

    @app.post("/api/exercise/check", response_model=CheckResult, tags=["exercise"])
    def check(request: Annotated[CheckRequest, Body()]) -> CheckResult:
        """Check the learner's figures for a case and give the worked solution."""
        problem = exercise.pose(request.case.case())
        answers: list[float | None] = list(request.answers)  # type: ignore[arg-type]  # parsed by _answer
        if len(answers) > len(problem.steps):
            raise RequestValidationError([{"loc": ("body", "answers"), "type": "too_long",
                                           "msg": f"this case asks for {len(problem.steps)} figures, "
                                                  f"got {len(answers)}"}])
        answers += [None] * (len(problem.steps) - len(answers))
        results = [StepResult(prompt=s.prompt, tolerance=s.tolerance, answer=a,
                              right=None if a is None else s.check(a), expected=s.expected, shown=s.shown)
                   for s, a in zip(problem.steps, answers, strict=True)]
        return CheckResult(steps=results, right=sum(1 for r in results if r.right), solution=list(problem.solution),
                           verdict=problem.verdict)

    @app.get("/api/exercise/drill", response_model=PosedCase, tags=["exercise"])
    def drill(seed: Annotated[int | None, Query(ge=0, le=2**32, description="repeatable draws")] = None
              ) -> PosedCase:
        """A fresh case (any V, starting loss or pre-activation) to drill the arithmetic."""
        case = exercise.draw_cases(1, lesson.drill_stories, random.Random(seed))[0]
        problem = exercise.pose(case)
        return PosedCase(kind=case.kind, classes=case.classes, loss=case.loss, preactivation=case.preactivation,
                         story=case.story, steps=[StepOut(prompt=s.prompt, tolerance=s.tolerance)
                                                  for s in problem.steps])

    # --- review -------------------------------------------------------------------------------------------

    def store_failed(e: store.StoreError) -> HTTPException:
        return HTTPException(503, f"the review database cannot be used: {e}")

    @app.get("/api/review", response_model=ReviewState, tags=["review"])
    def review_state() -> ReviewState:
        """Due and new counts and the next card, from the database `nnvitals study review` uses."""
        try:
            return _review_state(db, lesson)
        except store.StoreError as e:
            raise store_failed(e) from None

    @app.post("/api/review/grade", response_model=Graded, tags=["review"])
    def grade(request: GradeRequest) -> Graded:
        """Record a grade (FSRS) for a card; the answer holds when it comes back and the next card."""
        try:
            done = store.grade(db, request.card_id, request.rating)
            queue = _review_state(db, lesson)
        except store.StoreError as e:
            raise store_failed(e) from None
        return Graded(review=ReviewOut(id=done.id, card_id=done.card_id, rating=done.rating,
                                       rating_name=done.rating_name, due=done.due, state=done.state), queue=queue)

    # --- lab ----------------------------------------------------------------------------------------------

    @app.get("/api/runs", tags=["lab"])
    def list_runs() -> list[dict[str, Any]]:
        """The lab runs in the runs folder, newest first, with each finished stage's headline numbers (a run
        whose files are not the lab's has `problem` saying so)."""
        return runs.list_runs(runs_path, runner.running())

    @app.get("/api/runs/{run_id}", tags=["lab"])
    def run_summary(run_id: str) -> dict[str, Any]:
        """A finished run's summary.json (its fields are described in nnvitals.lab.report)."""
        try:
            found = runs.summary(runs_path, run_id)
        except runs.UnknownRun:
            raise HTTPException(404, f"no lab run {run_id!r} in {runs_path}") from None
        if found is None:
            raise HTTPException(404, f"the lab run {run_id!r} has not finished: it has no summary yet")
        return found

    @app.get("/api/lab/job", response_model=JobStatus, tags=["lab"])
    def job_status() -> dict[str, Any]:
        """The lab run started from the page: how far each stage got, or how it ended."""
        return runner.status()

    @app.post("/api/lab/job", response_model=JobStatus, status_code=202, tags=["lab"],
              responses={409: {"description": "a lab run is already in progress"}})
    def start_job(request: Annotated[JobRequest | None, Body()] = None) -> dict[str, Any]:
        """Start a lab run in the background (one at a time); it appears in the runs list when done. With no
        body, every stage with the quick profile's steps."""
        asked = request or JobRequest(stages=None, steps=None)
        try:
            return runner.start(asked.stages, asked.steps)
        except runs.Busy as e:
            raise HTTPException(409, str(e)) from None
        except OSError as e:
            raise HTTPException(503, str(e)) from None

    @app.post("/api/lab/job/cancel", response_model=JobStatus, tags=["lab"],
              responses={409: {"description": "no lab run is in progress"}})
    def cancel_job() -> dict[str, Any]:
        """Stop the run in progress (it saves a checkpoint; `nnvitals lab --resume` continues it); a run that
        has not stopped 20 s later is killed."""
        try:
            return runner.cancel()
        except LookupError as e:
            raise HTTPException(409, str(e)) from None

    return app
