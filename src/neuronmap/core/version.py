"""The package version, kept at the bottom of the import graph so that every stage may record it."""

VERSION = "0.1.0"
