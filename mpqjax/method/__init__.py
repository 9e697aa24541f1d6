"""The 6Bit-Diffusion method: DMPQ predictor (predictor), Temporal Delta Cache with Purified
Delta Refresh (tdc), run-time knobs as arrays (knobs) and the calibration file (calibration).
The formulas are in docs/METHOD.md."""
