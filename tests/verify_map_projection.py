"""Check the Mercator loss against values known in closed form and print a report.

Run from anywhere as ``python tests/verify_map_projection.py``. The exit status is 0
when every check passes and 1 otherwise, and each failed check prints a ``[FAIL]``
line with the measured and expected values.

Cases, in D = 128 with a seeded random unit direction ``u``:

- teacher = 100 u, student = u: MSE is 99^2 / 128, the Mercator loss with beta = 0 is
  0 and the cosine is 1. With beta the loss is beta * (ln 100)^2.
- orthogonal and opposite vectors: cosine 0 and -1, loss 1 and 2.
- ``u`` rotated by an angle inside a plane: cosine equals cos(angle).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from distill.losses import MercatorKVLoss, MSEKVLoss  # noqa: E402

DIM = 128
SEED = 0
TOLERANCE = 1e-6
ANGLES_DEGREES = (15, 30, 45, 60, 90, 180)


def unit_pair(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return two orthonormal float64 vectors drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=generator, dtype=torch.float64)
    u = u / u.norm()
    w = torch.randn(dim, generator=generator, dtype=torch.float64)
    w = w - (w @ u) * u
    return u, w / w.norm()


def rotate(u: torch.Tensor, w: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate ``u`` by ``degrees`` inside the plane spanned by orthonormal ``u`` and ``w``."""
    radians = math.radians(degrees)
    return math.cos(radians) * u + math.sin(radians) * w


class Report:
    """Collected check results and the lines to print."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, name: str, measured: float, expected: float, tolerance: float = TOLERANCE) -> None:
        if not abs(measured - expected) <= tolerance:
            self.failures.append(f"[FAIL] {name}: measured {measured:.6f}, expected {expected:.6f} (+-{tolerance:g})")


def main() -> int:
    report = Report()
    u, w = unit_pair(DIM, SEED)
    student, teacher = u, 100.0 * u

    mse, _ = MSEKVLoss()(student, teacher)
    mercator, metrics = MercatorKVLoss(beta=0.0)(student, teacher)
    report.check("MSE, teacher = 100 x student", mse.item(), 99.0**2 / DIM)
    report.check("Mercator loss, beta 0", mercator.item(), 0.0)
    report.check("cosine, teacher = 100 x student", metrics["cos_sim"], 1.0)

    for beta in (0.01, 0.1):
        total, _ = MercatorKVLoss(beta=beta)(student, teacher)
        report.check(f"Mercator loss, beta {beta}", total.item(), beta * math.log(100.0) ** 2)

    orthogonal, orthogonal_metrics = MercatorKVLoss()(u, w)
    report.check("cosine, orthogonal", orthogonal_metrics["cos_sim"], 0.0)
    report.check("loss, orthogonal", orthogonal.item(), 1.0)
    opposite, opposite_metrics = MercatorKVLoss()(u, -u)
    report.check("cosine, opposite", opposite_metrics["cos_sim"], -1.0)
    report.check("loss, opposite", opposite.item(), 2.0)

    angle_rows = []
    for degrees in ANGLES_DEGREES:
        _, angle_metrics = MercatorKVLoss()(u, rotate(u, w, degrees))
        expected = math.cos(math.radians(degrees))
        report.check(f"cosine at {degrees} deg", angle_metrics["cos_sim"], expected)
        angle_rows.append((degrees, angle_metrics["cos_sim"], expected))

    for line in report.failures:
        print(line)
    if report.failures:
        print(f"[FAIL] Verification failed: {len(report.failures)} check(s)")
    else:
        print("[PASS] Verification successful!")
    print(f"MSE Loss: {mse.item():.2f} (treats as error)")
    print(f"Mercator Loss: {mercator.item():.6f} (recognizes alignment)")
    print(f"Cosine Sim: {metrics['cos_sim']:.6f} (perfect match)")
    print("Rotation angle -> measured cosine (expected cos(angle)):")
    for degrees, measured, expected in angle_rows:
        print(f"  {degrees:>3} deg: {measured:+.5f} (expected {expected:+.5f})")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
