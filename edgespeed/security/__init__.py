"""Security: fleet CA and certificates (payload sealing and signing come with the security issue)."""

from edgespeed.security.pki import FleetCA, Identity, create_ca, issue_certificate, load_ca

__all__ = ["FleetCA", "Identity", "create_ca", "issue_certificate", "load_ca"]
