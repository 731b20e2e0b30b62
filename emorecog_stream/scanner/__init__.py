"""The scanner bridge: the MRI scanner's real-time export folder -> 246 ROI means on LSL.

Data moves through it in this order: ``files`` (read NIfTI / DICOM volumes with nibabel and
pydicom) -> ``watch`` (notice new files in the export folder, by events or polling) ->
``motion`` (rigid registration to the run's reference, framewise displacement) -> ``atlas``
(mean of each label's voxels) -> ``bridge`` (LSL outlets ``fMRI`` and ``Motion``). ``rigid``
holds the one rigid-body convention everything shares; ``sim`` writes a rehearsal session.
"""
