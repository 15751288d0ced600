"""Results as DICOM objects for the PACS (pure: records and pixels in, pydicom data sets out).

* one Comprehensive SR per study: a TID 1500 Measurement Report with, per model, a measurement
  group holding the probability of pneumonia (and the calibrated one), the decision threshold
  and the decision (Pneumonia present/absent), the model as algorithm identification, the
  source images referenced;
* per image and model a derived Secondary Capture of the Grad-CAM overlay, "NOT FOR DIAGNOSTIC
  USE" burned in and in the Series Description; or, instead, a GSPS drawing the map's contour.

UIDs are derived from what the object reports (the source instances and model versions), so
building it again gives the same UIDs: a resend replaces, never duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

NOTICE = "NOT FOR DIAGNOSTIC USE"
MANUFACTURER = "batchcxr"
SERIES_SR, SERIES_SC, SERIES_GSPS = 9901, 9902, 9903
PRIVATE_SCHEME = "99BATCHCXR"


@dataclass(frozen=True)
class SourceImage:
    """What a derived object needs of the image it comes from."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    rows: int
    columns: int
    patient_orientation: str = ""


@dataclass(frozen=True)
class StudyRecord:
    study_instance_uid: str
    patient_name: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""


@dataclass(frozen=True)
class Finding:
    """One model's result on one image."""

    image: SourceImage
    model_name: str
    model_version: str
    probability: float
    threshold: float
    label: str
    calibrated: float | None = None


def derived_uid(root: str, *parts: str) -> str:
    """A UID that is a pure function of ``parts`` (pydicom hashes them under ``root``)."""
    return generate_uid(prefix=root, entropy_srcs=[str(p) for p in parts])


def evidence(study: StudyRecord, image: SourceImage) -> Dataset:
    """A reference to a source image with the patient and study attributes highdicom copies;
    type 2 attributes the database does not keep are present and empty."""
    ds = Dataset()
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study.study_instance_uid, study.study_date, ""
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = study.accession_number, "", ""
    ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID = (image.series_instance_uid, image.sop_class_uid,
                                                               image.sop_instance_uid)
    ds.Modality = "DX"
    ds.Rows, ds.Columns = image.rows, image.columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsStored = 1, "MONOCHROME2", 8
    return ds


def _codes():
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    return dict(
        pneumonia=CodedConcept("233604007", "SCT", "Pneumonia"),
        probability=codes.DCM.Probability,
        calibrated=CodedConcept("CALPROB", PRIVATE_SCHEME, "Calibrated probability"),
        threshold=CodedConcept("THRESHOLD", PRIVATE_SCHEME, "Decision threshold"),
        unit=CodedConcept("1", "UCUM", "no units"),
        present=codes.SCT.Present, absent=codes.SCT.Absent,
        procedure=CodedConcept("36554-4", "LN", "XR Chest Single view"),
        title=codes.DCM.ImagingMeasurementReport, device=codes.DCM.Device,
    )


def _finish(ds: Dataset, description: str) -> Dataset:
    ds.SeriesDescription = f"{description} - {NOTICE}"[:64]
    ds.BodyPartExamined = "CHEST"  # not a paired structure: no Laterality (dciodvfy's condition for it)
    return ds


def pneumonia_sr(study: StudyRecord, findings: list[Finding], root: str) -> Dataset:
    """The study's TID 1500 measurement report."""
    import highdicom as hd

    c = _codes()
    content = sorted(f"{f.image.sop_instance_uid}|{f.model_version}" for f in findings)
    uid = derived_uid(root, "sr", study.study_instance_uid, *content)
    groups = []
    for f in sorted(findings, key=lambda f: (f.model_name, f.image.sop_instance_uid)):
        algo = hd.sr.AlgorithmIdentification(name=f.model_name, version=f.model_version, manufacturer=MANUFACTURER)
        measurements = [hd.sr.Measurement(name=c["probability"], value=round(f.probability, 6), unit=c["unit"],
                                          algorithm_id=algo),
                        hd.sr.Measurement(name=c["threshold"], value=round(f.threshold, 6), unit=c["unit"])]
        if f.calibrated is not None:
            measurements.append(hd.sr.Measurement(name=c["calibrated"], value=round(f.calibrated, 6), unit=c["unit"],
                                                  algorithm_id=algo))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(root, "group", f.image.sop_instance_uid, f.model_version),
                identifier=f"{f.model_name} pneumonia"),
            finding_type=c["pneumonia"], algorithm_id=algo, measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=c["pneumonia"], value=c["present"] if f.label == "PNEUMONIA" else c["absent"])],
            source_images=[hd.sr.SourceImageForMeasurementGroup(f.image.sop_class_uid, f.image.sop_instance_uid)]))
    observer = hd.sr.ObserverContext(
        observer_type=c["device"],
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(root, "device", MANUFACTURER), name=MANUFACTURER, manufacturer_name=MANUFACTURER))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=c["procedure"], imaging_measurements=groups, title=c["title"])
    images = {f.image.sop_instance_uid: f.image for f in findings}
    sr = hd.sr.ComprehensiveSR(
        evidence=[evidence(study, i) for i in images.values()], content=report[0],
        series_instance_uid=derived_uid(root, "sr-series", study.study_instance_uid), series_number=SERIES_SR,
        sop_instance_uid=uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True)
    scheme = Dataset()
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = PRIVATE_SCHEME, "batchcxr codes"
    sr.CodingSchemeIdentificationSequence = [scheme]
    return _finish(sr, "batchcxr pneumonia AI result")


def overlay_rgb(display: np.ndarray, heat_layer: np.ndarray | None, text: str) -> np.ndarray:
    """The display image with a BGRA Grad-CAM layer blended over it and a notice burned in: RGB."""
    base = cv2.cvtColor(display, cv2.COLOR_GRAY2BGR) if display.ndim == 2 else display[..., :3].copy()
    if heat_layer is not None:
        layer = cv2.resize(heat_layer, (base.shape[1], base.shape[0]), interpolation=cv2.INTER_LINEAR)
        alpha = layer[..., 3:].astype(np.float32) / 255
        base = (base * (1 - alpha) + layer[..., :3] * alpha).astype(np.uint8)
    scale = max(0.4, base.shape[1] / 900)
    for line, y in ((NOTICE, 0.06), (text, 0.11)):
        org = (int(base.shape[1] * 0.02), int(base.shape[0] * y))
        cv2.putText(base, line, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), max(2, int(3 * scale)), cv2.LINE_AA)
        cv2.putText(base, line, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), max(1, int(scale)),
                    cv2.LINE_AA)
    return cv2.cvtColor(base, cv2.COLOR_BGR2RGB)


def gradcam_sc(study: StudyRecord, finding: Finding, rgb: np.ndarray, root: str) -> Dataset:
    """A derived Secondary Capture of one model's Grad-CAM overlay on one image."""
    import highdicom as hd

    image = finding.image
    orientation = tuple(image.patient_orientation.split("\\")) if image.patient_orientation.count("\\") == 1 else ("L", "F")
    sc = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(rgb), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", study_instance_uid=study.study_instance_uid,
        series_instance_uid=derived_uid(root, "sc-series", study.study_instance_uid, finding.model_name),
        series_number=SERIES_SC, sop_instance_uid=derived_uid(root, "sc", image.sop_instance_uid, finding.model_version),
        instance_number=1, manufacturer=MANUFACTURER, patient_id=study.patient_id, patient_name=study.patient_name,
        patient_birth_date="", patient_sex="", accession_number=study.accession_number, study_id="",
        study_date=study.study_date or None, referring_physician_name="", patient_orientation=orientation)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = image.sop_class_uid, image.sop_instance_uid
    sc.SourceImageSequence = [source]
    sc.DerivationDescription = f"Grad-CAM of {finding.model_name} {finding.model_version} over the source image"[:1024]
    return _finish(sc, f"Grad-CAM {finding.model_name}")


def heat_contour(heat_layer: np.ndarray, rows: int, columns: int, level: float = 0.5) -> list[np.ndarray]:
    """Contours (in the source image's pixel coordinates, column then row) where the layer's alpha
    reaches ``level`` of its maximum."""
    alpha = heat_layer[..., 3].astype(np.float32)
    if alpha.max() <= 0:
        return []
    mask = (cv2.resize(alpha, (columns, rows), interpolation=cv2.INTER_LINEAR) >= level * alpha.max()).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        points = c[:, 0, :].astype(np.float64) + 1.0  # DICOM pixel coordinates start at 1
        if len(points) >= 3:
            out.append(np.vstack([points, points[:1]]))
    return out


def gradcam_gsps(study: StudyRecord, finding: Finding, contours: list[np.ndarray], root: str) -> Dataset:
    """A Grayscale Softcopy Presentation State drawing one model's Grad-CAM contour on the source."""
    import highdicom as hd

    image = finding.image
    ref = evidence(study, image)
    layer = hd.pr.GraphicLayer(layer_name="GRADCAM", order=1, description=f"Grad-CAM {finding.model_name}")
    objects = [hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=c,
                                   units=hd.pr.AnnotationUnitsValues.PIXEL) for c in contours]
    text = hd.pr.TextObject(text_value=f"{NOTICE}: {finding.model_name} P={finding.probability:.2f}",
                            units=hd.pr.AnnotationUnitsValues.PIXEL, anchor_point=(10.0, 20.0))
    annotation = hd.pr.GraphicAnnotation(referenced_images=[ref], graphic_layer=layer, graphic_objects=objects or None,
                                         text_objects=[text])
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[ref],
        series_instance_uid=derived_uid(root, "gsps-series", study.study_instance_uid, finding.model_name),
        series_number=SERIES_GSPS,
        sop_instance_uid=derived_uid(root, "gsps", image.sop_instance_uid, finding.model_version), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=MANUFACTURER, software_versions=finding.model_version,
        device_serial_number="0", content_label="GRADCAM",
        content_description=f"Grad-CAM {finding.model_name} {NOTICE}"[:64], graphic_annotations=[annotation],
        graphic_layers=[layer])
    return _finish(gsps, f"Grad-CAM contour {finding.model_name}")
