"""Renderers: console (rich), JSON (Report.to_json) and HTML all read the same Report object.

Installed as `sftdoctor.reports`.
"""
