# SPDX-License-Identifier: Apache-2.0
"""Checking cars' results: Freivalds for gemm, quorum and ringers, reputation (pure logic)."""

from __future__ import annotations

import hashlib
import math
import time
from unittest import mock

import numpy as np
import pytest

from parkpool.producer import claimcheck
from parkpool.producer.claimcheck import array_sha256
from parkpool.producer.fftcheck import FftCheck
from parkpool.producer.freivalds import GemmCheck, HashTap
from parkpool.producer.plans import ChunkSpec
from parkpool.producer.splitters import plan_gemm
from parkpool.producer.verify import (
    Accept,
    AdaptivePolicy,
    Fail,
    JobVerifier,
    Judged,
    Misfit,
    Redo,
    reachable,
)
from parkpool.runtime.reputation import TRUST_AFTER, ReputationBook
from parkpool.schemas import Result, TaskChunk, ValidationError, decode, encode
from parkpool.schemas.kernels import spec
from parkpool.schemas.reputation import CarState, CarTally, Evidence, Level, QuarantineNotice

GEMM_TOL = spec("gemm").tolerance


def tiles(a: np.ndarray, b: np.ndarray, tile: int, k_tile: int | None = None) -> list:
    return [c.inputs for c in plan_gemm(a, b, tile=tile, k_tile=k_tile).chunks]


def specs(inputs: list) -> list[ChunkSpec]:
    return [ChunkSpec({}, chunk) for chunk in inputs]


def honest(inputs: dict, gpu_like: bool = False) -> np.ndarray:
    """A tile as a CPU (float32 BLAS) or a GPU (another summation order) returns it."""
    a, b = inputs["a"], inputs["b"]
    if gpu_like:
        return (a.astype(np.float64) @ b.astype(np.float64)).astype(a.dtype)
    return a @ b


def result(chunk: int, n: int, car: str, **outputs: np.ndarray) -> Result:
    return Result("job1", chunk, n, car, "gw1", 1, 1, outputs, 0.1, time.time(), 0.0)


def operands(rng: np.random.Generator, m: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((m, k)).astype(np.float32)
    return a, rng.standard_normal((k, n)).astype(np.float32)


class TestFreivalds:
    """A wrong tile fails, an honest one (CPU or GPU rounding) never does."""

    @pytest.mark.parametrize("gpu_like", [False, True], ids=["cpu", "gpu-order"])
    @pytest.mark.parametrize("k_tile", [None, 96])
    def test_honest_tiles_pass(self, gpu_like: bool, k_tile: int | None) -> None:
        # Given a job's tiles computed honestly, in either summation order
        rng = np.random.default_rng(1)
        a, b = operands(rng, 300, 250, 310)
        chunks = tiles(a, b, 128, k_tile)
        check = GemmCheck(chunks, GEMM_TOL, rng=rng)
        # When every tile is checked
        verdicts = [v for i, c in enumerate(chunks) for v in check.add(i, honest(c, gpu_like))]
        # Then each is judged once, and valid
        assert sorted(v.chunk_id for v in verdicts) == list(range(len(chunks)))
        assert all(v.valid for v in verdicts)

    @pytest.mark.parametrize("k_tile", [None, 96])
    def test_a_check_prepared_while_hashing_judges_the_same(self, k_tile: int | None) -> None:
        # Given one plan whose blocks were hashed through the check's tap, phase by
        # phase as the claim check does, honest tiles and one wrong one
        rng = np.random.default_rng(12)
        a, b = operands(rng, 300, 250, 310)
        plan = plan_gemm(a, b, tile=128, k_tile=k_tile)
        inputs = [c.inputs for c in plan.chunks]
        tap = HashTap(inputs)
        for phase in tap.phases():
            for block in phase:  # and each block's hash is the one of its bytes
                assert array_sha256(block, tap) == hashlib.sha256(block.tobytes()).hexdigest()
        prepared = tap.prepared()
        assert prepared is not None
        check = GemmCheck(inputs, GEMM_TOL, prepared=prepared)
        verdicts = []
        for i, chunk in enumerate(inputs):
            c = honest(chunk)
            if i == 3:
                c = _lie(c, "one_element", rng)
            verdicts += check.add(i, c)
        # Then every tile is judged once, and only the wrong one is invalid
        assert sorted(v.chunk_id for v in verdicts) == list(range(len(inputs)))
        assert [v.chunk_id for v in verdicts if not v.valid] == [3]

    def test_a_tap_that_missed_a_block_prepares_nothing(self) -> None:
        # Given a tap whose blocks of B were hashed, but one of them not through it (a
        # block too small to store rides inline, and is not hashed)
        rng = np.random.default_rng(14)
        a, b = operands(rng, 64, 32, 64)
        inputs = [c.inputs for c in plan_gemm(a, b, tile=32).chunks]
        tap = HashTap(inputs)
        _skipped, *other_bs = tap.phases()[0]
        for block in other_bs:
            array_sha256(block, tap)
        # Then the blocks of A that meet it get no product, and nothing is prepared:
        # the check makes its products itself when the tiles come
        for block in tap.phases()[1]:
            array_sha256(block, tap)
        assert tap.prepared() is None

    def test_a_tap_that_fails_costs_the_hash_nothing_and_prepares_nothing(self) -> None:
        # Given a tap that breaks on its third band (a bug in a check)
        rng = np.random.default_rng(15)
        a, b = operands(rng, 64, 64, 64)
        inputs = [c.inputs for c in plan_gemm(a, b, tile=32).chunks]

        class Broken(HashTap):
            calls = 0

            def band(self, block: np.ndarray, rows: slice) -> None:
                Broken.calls += 1
                if Broken.calls == 3:
                    raise RuntimeError("a bug")
                super().band(block, rows)

        tap = Broken(inputs)
        # When every block is hashed through it, in bands of one row each
        hashes = []
        with mock.patch.object(claimcheck, "HASH_BAND_BYTES", 1):
            for phase in tap.phases():
                hashes += [(array_sha256(block, tap), block) for block in phase]
        # Then every hash is still the one of its block's bytes
        assert all(h == hashlib.sha256(block.tobytes()).hexdigest() for h, block in hashes)
        # And nothing is prepared, so the check makes its own products
        assert tap.prepared() is None

    def test_a_prepared_check_refuses_another_plans_blocks(self) -> None:
        rng = np.random.default_rng(13)
        a, b = operands(rng, 64, 32, 64)
        first = [c.inputs for c in plan_gemm(a, b, tile=32).chunks]
        second = [c.inputs for c in plan_gemm(a, b, tile=32).chunks]
        tap = HashTap(first)
        for phase in tap.phases():
            for block in phase:
                array_sha256(block, tap)
        with pytest.raises(ValueError, match="another plan"):
            GemmCheck(second, GEMM_TOL, prepared=tap.prepared())

    def test_tiles_wait_for_their_group_then_are_judged_together(self) -> None:
        rng = np.random.default_rng(2)
        a, b = operands(rng, 256, 64, 256)
        chunks = tiles(a, b, 128)  # 2 row panels x 2 column panels
        check = GemmCheck(chunks, GEMM_TOL, rng=rng)
        # When the first tile of a row panel arrives, nothing can be said yet
        assert check.add(0, honest(chunks[0])) == []
        # Then the second tile of that panel settles both
        assert [v.chunk_id for v in check.add(1, honest(chunks[1]))] == [0, 1]

    @pytest.mark.parametrize("lie", [None, "one_element"])
    def test_a_group_completed_by_a_zero_tile_is_judged_right(self, lie: str | None) -> None:
        # Given a product whose last column panel is zero, so the tile that completes
        # each group samples max|C| as 0 and the group needs every tile's sample
        rng = np.random.default_rng(7)
        a, b = operands(rng, 256, 64, 384)
        b[:, 256:] = 0
        chunks = tiles(a, b, 128)  # 2 row panels x 3 column panels
        check = GemmCheck(chunks, GEMM_TOL, rng=rng)
        verdicts = []
        for i, chunk in enumerate(chunks):
            c = honest(chunk)
            if lie is not None and i == 1:
                c = _lie(c, lie, rng)
            verdicts += check.add(i, c)
        # Then every tile is judged once, and only a wrong one is invalid
        assert sorted(v.chunk_id for v in verdicts) == list(range(6))
        assert [v.chunk_id for v in verdicts if not v.valid] == ([1] if lie else [])

    def test_a_second_car_before_the_group_completes_does_not_complete_it(self) -> None:
        rng = np.random.default_rng(8)
        a, b = operands(rng, 128, 64, 384)
        # Given one row panel of 3 tiles, checked together
        chunks = tiles(a, b, 128)
        check = GemmCheck(chunks, GEMM_TOL, rng=rng)
        # When tile 0 arrives twice (a redelivery from another car) and tile 1 once
        assert check.add(0, honest(chunks[0])) == []
        assert check.add(0, honest(chunks[0])) == []
        assert check.add(1, honest(chunks[1])) == []
        # Then only tile 2 completes the group
        assert [v.chunk_id for v in check.add(2, honest(chunks[2]))] == [0, 1, 2]

    @pytest.mark.parametrize(
        "lie",
        ["one_element", "noise", "zeroed", "nan", "inf", "transposed_blocks"],
    )
    def test_wrong_tiles_are_caught_and_only_they(self, lie: str) -> None:
        # Given a job in which tile 5 is wrong
        rng = np.random.default_rng(3)
        a, b = operands(rng, 512, 256, 512)
        chunks = tiles(a, b, 128)
        check = GemmCheck(chunks, GEMM_TOL, rng=rng)
        verdicts = []
        for i, chunk in enumerate(chunks):
            c = honest(chunk)
            if i == 5:
                c = _lie(c, lie, rng)
            verdicts += check.add(i, c)
        # Then tile 5 alone is invalid, with the residual in the detail
        wrong = [v for v in verdicts if not v.valid]
        assert [v.chunk_id for v in wrong] == [5]
        assert "Freivalds residual" in wrong[0].detail

    def test_a_redone_tile_is_checked_alone(self) -> None:
        rng = np.random.default_rng(4)
        a, b = operands(rng, 128, 64, 256)
        chunks = tiles(a, b, 128)
        check = GemmCheck(chunks, GEMM_TOL, rng=rng)
        check.add(0, honest(chunks[0]) + 1.0)
        verdicts = check.add(1, honest(chunks[1]))
        assert [(v.chunk_id, v.valid) for v in verdicts] == [(0, False), (1, True)]
        check.forget(0)
        # When the redo comes back right
        (redo,) = check.add(0, honest(chunks[0]))
        assert redo.valid and redo.chunk_id == 0

    def test_a_group_missing_a_tile_for_good_judges_the_rest_alone(self) -> None:
        rng = np.random.default_rng(5)
        a, b = operands(rng, 128, 64, 256)
        chunks = tiles(a, b, 128)
        check = GemmCheck(chunks, GEMM_TOL, rng=rng)
        assert check.add(0, honest(chunks[0])) == []
        # When tile 1 was dead-lettered
        (verdict,) = check.release(1)
        assert verdict.chunk_id == 0 and verdict.valid

    def test_no_honest_tile_is_accused_over_many_trials(self) -> None:
        # Given many small jobs of varied shapes and scales, in both summation orders
        rng = np.random.default_rng(6)
        accused = 0
        for trial in range(200):
            m, k, n = (int(v) for v in rng.integers(8, 200, size=3))
            a, b = operands(rng, m, k, n)
            a *= 10.0 ** rng.integers(-3, 4)
            chunks = tiles(a, b, 64)
            check = GemmCheck(chunks, GEMM_TOL, rng=rng)
            for i, chunk in enumerate(chunks):
                accused += sum(not v.valid for v in check.add(i, honest(chunk, trial % 2 == 0)))
        # Then none is
        assert accused == 0


class TestFftFunctional:
    """fft chunks are checked by a random linear functional: cheap, and exact enough."""

    @pytest.mark.parametrize("inverse", [False, True])
    @pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.float64])
    def test_honest_transforms_pass_and_wrong_ones_fail(self, inverse: bool, dtype: type) -> None:
        # Given a batch of rows, transformed by NumPy (a CPU) and in float64 (another order)
        rng = np.random.default_rng(10)
        x = rng.standard_normal((64, 1024)).astype(dtype)
        if np.issubdtype(dtype, np.complexfloating):
            x = (x + 1j * rng.standard_normal(x.shape)).astype(dtype)
        out = np.complex64 if dtype in (np.float32, np.complex64) else np.complex128
        transform = np.fft.ifft if inverse else np.fft.fft
        cpu = transform(x, axis=-1).astype(out)
        exact = transform(x.astype(np.complex128), axis=-1).astype(out)
        params = {"inverse": inverse}
        check = FftCheck([{"x": x}] * 3, [params] * 3, spec("fft").tolerance, 1, rng)
        # Then both honest results pass
        assert check.add(0, cpu)[0].valid and check.add(1, exact)[0].valid
        # And one element off by 1 % of the largest fails
        wrong = cpu.copy()
        wrong[5, 9] += 0.01 * np.abs(cpu).max()
        (verdict,) = check.add(2, wrong)
        assert not verdict.valid and "linear functional residual" in verdict.detail

    def test_fft_is_checked_algebraically_by_the_verifier(self) -> None:
        rng = np.random.default_rng(11)
        x = rng.standard_normal((8, 256)).astype(np.float32)
        chunks = [ChunkSpec({}, {"x": x})]
        v = JobVerifier("job1", spec("fft"), chunks, ReputationBook())
        actions = v.take(result(0, 1, "car", y=np.fft.fft(x).astype(np.complex64)))
        assert isinstance(actions[-1], Accept) and actions[-1].level is Level.ALGEBRAIC


def _lie(c: np.ndarray, lie: str, rng: np.random.Generator) -> np.ndarray:
    c = c.copy()
    scale = float(np.abs(c).max())
    if lie == "one_element":
        c[17, 33] += 0.05 * scale
    elif lie == "noise":
        c += (rng.standard_normal(c.shape) * 1e-3 * scale).astype(c.dtype)
    elif lie == "zeroed":
        c[:] = 0
    elif lie == "nan":
        c[3, 3] = np.nan
    elif lie == "inf":
        c[3, 3] = np.inf
    else:
        c = np.ascontiguousarray(c.T)
    return c


def trusted_book(*cars: str) -> ReputationBook:
    book = ReputationBook()
    for car in cars:
        book.apply(CarTally(car, "w", 0, 10**12, 0, 0, 1.0))  # spot-checked 1e-11 of the time
    return book


class TestQuorum:
    """Kernels without an algebraic check get a second car's opinion when policy says."""

    def verifier(self, book: ReputationBook, minimum: Level = Level.RINGER_TRUSTED) -> JobVerifier:
        chunks = [ChunkSpec({"op": "sum"}, {"x": np.arange(4.0)})] * 3
        policy = AdaptivePolicy(spot_floor=0.0, ringer_rate=0.0)
        return JobVerifier("job1", spec("reduce"), chunks, book, minimum=minimum, policy=policy)

    def test_a_new_car_is_confirmed_by_a_second_one(self) -> None:
        v = self.verifier(ReputationBook())
        # When a new car returns chunk 0
        assert v.take(result(0, 3, "new", y=np.array([6.0]))) == [Redo(0, ("new",))]
        # Then a second car's matching result settles it, both counted valid
        actions = v.take(result(0, 3, "other", y=np.array([6.0])))
        assert isinstance(actions[0], Accept) and actions[0].level is Level.QUORUM
        assert actions[1:] == [Judged("new", True), Judged("other", True)]

    def test_a_disagreement_is_settled_by_a_third_car(self) -> None:
        v = self.verifier(ReputationBook())
        v.take(result(1, 3, "liar", y=np.array([7.0])))
        # When the second car disagrees, a third is asked, avoiding both
        assert v.take(result(1, 3, "a", y=np.array([6.0]))) == [Redo(1, ("liar", "a"))]
        actions = v.take(result(1, 3, "b", y=np.array([6.0])))
        # Then the majority's answer is accepted and the odd one out proven wrong
        accepted = actions[0]
        assert isinstance(accepted, Accept) and accepted.result.vehicle_id == "a"
        (bad,) = [a for a in actions if isinstance(a, Judged) and a.valid is False]
        assert bad.vehicle_id == "liar" and bad.evidence is not None
        assert bad.evidence.check is Level.QUORUM

    def test_no_quorum_after_the_most_opinions_fails_the_chunk(self) -> None:
        v = self.verifier(ReputationBook())
        actions: list = []
        for i in range(AdaptivePolicy().max_opinions):
            actions = v.take(result(2, 3, f"car{i}", y=np.array([float(i)])))
        assert actions == [Fail(2, "no_quorum")]

    def test_a_trusted_car_is_taken_on_its_record(self) -> None:
        v = self.verifier(trusted_book("old"))
        actions = v.take(result(0, 3, "old", y=np.array([6.0])))
        assert actions[0] == Judged("old", None)
        assert isinstance(actions[1], Accept) and actions[1].level is Level.RINGER_TRUSTED

    def test_a_job_demanding_quorum_checks_even_a_trusted_car(self) -> None:
        v = self.verifier(trusted_book("old"), minimum=Level.QUORUM)
        assert v.take(result(0, 3, "old", y=np.array([6.0]))) == [Redo(0, ("old",))]

    def test_an_answer_its_assembler_refuses_is_unsettled_and_redone(self) -> None:
        v = self.verifier(trusted_book("old", "older"))
        # Given a trusted car's misfit, taken on its record and handed to the caller
        misfit = result(0, 3, "old", z=np.array([6.0]))
        accepted = v.take(misfit)[1]
        assert isinstance(accepted, Accept) and accepted.result is misfit
        # When the job's assembler refuses it
        actions = v.misfit(misfit, "missing_output: no 'y'")
        # Then it is held against the car and the chunk redone elsewhere, not left settled
        assert actions == [Judged("old", False), Redo(0, ("old",), "misfit_outputs")]
        assert v.wants(0)
        # And a fitting result settles the chunk again
        assert isinstance(v.take(result(0, 3, "older", y=np.array([6.0])))[1], Accept)

    def test_cars_agreeing_on_a_misfit_are_all_held_to_it_and_avoided(self) -> None:
        v = self.verifier(ReputationBook())
        # Given two new cars that agree on outputs the job cannot use
        assert v.take(result(2, 3, "a", z=np.array([6.0]))) == [Redo(2, ("a",))]
        actions = v.take(result(2, 3, "b", z=np.array([6.0])))
        accepted = actions[0]
        assert isinstance(accepted, Accept)
        # When the assembler refuses the answer they agreed on
        unsettled = v.misfit(accepted.result, "missing_output")
        # Then both are held to it, and the redo avoids both
        verdicts = [a for a in unsettled if isinstance(a, Judged)]
        assert sorted(j.vehicle_id for j in verdicts) == ["a", "b"]
        assert all(j.valid is False for j in verdicts)
        redo = unsettled[-1]
        assert isinstance(redo, Redo) and redo.why == "misfit_outputs"
        assert set(redo.avoid) == {"a", "b"}
        assert v.wants(2)

    def test_misfits_fail_the_chunk_by_name_after_the_most_opinions(self) -> None:
        v = self.verifier(trusted_book(*(f"car{i}" for i in range(3))))
        actions: list = []
        for i in range(AdaptivePolicy().max_opinions):
            misfit = result(1, 3, f"car{i}", y=np.zeros((2, 2)))
            v.take(misfit)
            actions = v.misfit(misfit, "bad_shape")
        assert actions[-1] == Fail(1, "outputs_misfit: bad_shape")

    def test_a_quarantined_cars_result_is_redone_elsewhere(self) -> None:
        book = ReputationBook()
        book.apply(QuarantineNotice("bad", CarState.QUARANTINED, 0, 1.0, "sdk", "wrong_result"))
        v = self.verifier(book)
        assert v.take(result(0, 3, "bad", y=np.array([6.0]))) == [Redo(0, ("bad",))]

    def test_a_ringer_is_judged_against_the_known_answer(self) -> None:
        chunks = [ChunkSpec({"op": "sum"}, {"x": np.arange(4.0)})]
        policy = AdaptivePolicy(spot_floor=0.0, ringer_rate=1.0)
        v = JobVerifier("job1", spec("reduce"), chunks, ReputationBook(), policy=policy)
        v.take(result(0, 1, "a", y=np.array([6.0])))
        actions = v.take(result(0, 1, "b", y=np.array([6.0])))
        assert actions[-1] == Redo(0, ("a", "b"))  # sent again, as a ringer
        assert v.wants(0)
        # When a third car runs the ringer and gets it wrong
        (judged,) = v.take(result(0, 1, "c", y=np.array([5.0])))
        assert isinstance(judged, Judged) and judged.valid is False
        assert judged.evidence is not None and judged.evidence.check is Level.RINGER_TRUSTED

    def test_a_level_the_kernel_cannot_reach_is_refused(self) -> None:
        with pytest.raises(ValidationError) as caught:
            reachable(spec("reduce"), Level.ALGEBRAIC)
        assert caught.value.reason == "verification_unreachable"
        reachable(spec("gemm"), Level.ALGEBRAIC)
        reachable(spec("fft"), Level.ALGEBRAIC)


class TestAlgebraicVerifier:
    """gemm results are checked and, when wrong, redone on another car."""

    def test_a_wrong_tile_is_redone_and_its_car_proven_wrong(self) -> None:
        rng = np.random.default_rng(8)
        a, b = operands(rng, 128, 64, 128)
        chunks = tiles(a, b, 128)
        v = JobVerifier("job1", spec("gemm"), specs(chunks), ReputationBook())
        actions = v.take(result(0, 1, "liar", c=honest(chunks[0]) * 1.1))
        assert actions[0] == Judged("liar", False, actions[0].evidence)  # type: ignore[union-attr]
        assert actions[1] == Redo(0, ("liar",))
        actions = v.take(result(0, 1, "good", c=honest(chunks[0])))
        assert actions[0] == Judged("good", True)
        assert isinstance(actions[1], Accept) and actions[1].level is Level.ALGEBRAIC

    def test_unusable_stored_outputs_are_redone_elsewhere_then_fail_the_chunk(self) -> None:
        rng = np.random.default_rng(10)
        a, b = operands(rng, 64, 32, 64)
        chunks = tiles(a, b, 64)
        policy = AdaptivePolicy(max_opinions=3)
        v = JobVerifier("job1", spec("gemm"), specs(chunks), ReputationBook(), policy=policy)
        # Given cars whose results name outputs the store does not hold as named
        first = v.unusable(result(0, 1, "car1"), "not in the store")
        # Then each is held against its car, with no proof (no quarantine), and the
        # chunk is redone on another car
        assert first == [Judged("car1", False), Redo(0, ("car1",), "unusable_outputs")]
        assert v.unusable(result(0, 1, "car1"), "not in the store") == []  # a redelivery
        second = v.unusable(result(0, 1, "car2"), "not in the store")
        assert second[1] == Redo(0, ("car1", "car2"), "unusable_outputs")  # neither again
        # And after max_opinions of them the chunk fails, by name
        last = v.unusable(result(0, 1, "car3"), "not in the store")
        assert last == [Judged("car3", False), Fail(0, "outputs_unreadable: not in the store")]

    def test_a_tile_of_the_wrong_shape_is_a_misfit_and_redone(self) -> None:
        rng = np.random.default_rng(9)
        a, b = operands(rng, 64, 32, 64)
        chunks = tiles(a, b, 64)
        v = JobVerifier("job1", spec("gemm"), specs(chunks), ReputationBook())
        odd = result(0, 1, "car", c=np.zeros((3, 3), np.float32))
        assert v.take(odd) == [Misfit(odd, "'c': shape (3, 3), want shape (64, 64)")]
        assert v.misfit(odd, "") == [Judged("car", False), Redo(0, ("car",), "misfit_outputs")]
        # And the redo's honest tile is checked and accepted
        actions = v.take(result(0, 1, "good", c=honest(chunks[0])))
        assert isinstance(actions[-1], Accept) and actions[-1].level is Level.ALGEBRAIC


class TestReputationBook:
    """Tallies add up across writers; a release starts a new generation."""

    def test_tallies_of_writers_add_and_the_last_of_each_wins(self) -> None:
        book = ReputationBook()
        book.apply(CarTally("car", "w1", 0, 3, 0, 1, 1.0))
        book.apply(CarTally("car", "w1", 0, 5, 0, 2, 2.0))  # w1's newer absolute counts
        book.apply(CarTally("car", "w2", 0, TRUST_AFTER, 0, 0, 2.0))
        record = book.record("car")
        assert (record.valid, record.invalid, record.unchecked) == (5 + TRUST_AFTER, 0, 2)
        assert record.trusted

    def test_a_gateways_book_keeps_quarantines_only(self) -> None:
        book = ReputationBook(tallies=False)
        book.apply(CarTally("car", "w1", 0, 50, 0, 0, 1.0))
        assert book.cars() == []
        book.apply(QuarantineNotice("car", "quarantined", 0, 1.0, "w1", "wrong_result"))
        assert book.quarantined_cars() == ["car"]

    def test_release_starts_the_car_again_as_new(self) -> None:
        book = ReputationBook()
        book.apply(CarTally("car", "w1", 0, 50, 1, 0, 1.0))
        evidence = (Evidence("job1", 3, Level.ALGEBRAIC, "residual", 1.0),)
        book.apply(QuarantineNotice("car", "quarantined", 0, 1.0, "w1", "wrong_result", evidence))
        assert book.quarantined("car") and book.quarantined_cars() == ["car"]
        book.apply(QuarantineNotice("car", "released", 1, 2.0, "operator", "released"))
        record = book.record("car")
        assert not record.quarantined and record.generation == 1
        assert (record.valid, record.invalid) == (0, 0) and not record.trusted


class TestWire:
    """The new records round-trip and refuse what is malformed."""

    def test_records_round_trip(self) -> None:
        evidence = (Evidence("job1", 3, Level.ALGEBRAIC, "residual 9 over 1", 1.5),)
        notice = QuarantineNotice("car", "quarantined", 2, 1.0, "sdk", "wrong_result", evidence)
        assert decode(encode(notice), QuarantineNotice) == notice
        tally = CarTally("car", "w1", 2, 10, 1, 4, 1.0)
        assert decode(encode(tally), CarTally) == tally

    @pytest.mark.parametrize(
        "bad",
        [
            {"vehicle_id": "car/1"},
            {"valid": -1},
            {"generation": math.inf},
        ],
    )
    def test_a_bad_tally_is_refused(self, bad: dict) -> None:
        fields = {
            "vehicle_id": "car",
            "writer": "w1",
            "generation": 0,
            "valid": 1,
            "invalid": 0,
            "unchecked": 0,
            "at": 1.0,
        }
        with pytest.raises(ValidationError):
            CarTally(**{**fields, **bad})

    def test_a_task_avoids_at_most_16_valid_vehicle_ids(self) -> None:
        base = ("job1", 0, 1, "reduce", {}, {}, "topic", 1.0, 0.0)
        assert TaskChunk(*base, avoid=("a", "b")).avoid == ("a", "b")
        with pytest.raises(ValidationError):
            TaskChunk(*base, avoid=tuple(f"c{i}" for i in range(17)))
        with pytest.raises(ValidationError):
            TaskChunk(*base, avoid=("car/1",))
