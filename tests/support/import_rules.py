"""An import-linter contract type that import-linter lacks: no direct import of a submodule of an external package.

import-linter squashes external packages to their top-level name, so `torch.distributed` cannot be forbidden
while `torch` is allowed; the import statements grimp recorded still say which submodule each one reaches.
"""

from __future__ import annotations

import re

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output


class ForbiddenSubmoduleContract(Contract):
    """`source_modules` (and everything in them) never import `forbidden_submodules` (dotted, external)."""

    type_name = "forbidden_submodule"

    source_modules = fields.ListField(subfield=fields.ModuleField())
    forbidden_submodules = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        patterns = {name: re.compile(rf"\b{re.escape(name)}\b") for name in self.forbidden_submodules}  # type: ignore[attr-defined]
        found: list[str] = []
        for source in self.source_modules:  # type: ignore[attr-defined]
            importers = {source.name} | graph.find_descendants(source.name)
            for importer in sorted(importers):
                for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                    for detail in graph.get_import_details(importer=importer, imported=imported):
                        line = detail["line_contents"]
                        hits = [name for name, pattern in patterns.items() if pattern.search(line)]
                        found += [f"{importer}:{detail['line_number']}: {line} ({name})" for name in hits]
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["found"]:
            output.print_error(line)
