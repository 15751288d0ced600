"""The Store's records of input files: last outcome and identity per path, claims, incomplete-file
timers. Mixed into Store (store/repo.py); no SQL outside the store package."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from batchcxr.store.schema import Claim, IncompleteFile, SourceFile, utcnow

if TYPE_CHECKING:
    from batchcxr.domain import SourceFile as Source
    from batchcxr.ingest.files import FileIdentity


def path_hash(path: str) -> str:
    return hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class KnownFile:
    """What was recorded for a path whose identity has not changed since."""

    status: str
    reason: str
    sha256: str
    stage: str = ""


@dataclass(frozen=True)
class FailedFile:
    """A file not scored, for the lists on the report index and in `batchcxr status`."""

    id: int
    path: str
    status: str
    stage: str
    reason: str
    run_id: int | None
    updated_at: dt.datetime
    moved_to: str


class FileRecords:
    """Source-file records, claims and incomplete timers (a mixin of Store)."""

    def session(self) -> Session:  # provided by Store
        raise NotImplementedError

    def read_session(self) -> Session:  # provided by Store
        raise NotImplementedError

    def _upsert(self, s, model, rows, keys, update_cols, keep_nonempty=()):  # provided by Store
        raise NotImplementedError

    # last outcome per path -------------------------------------------------
    def _write_sources(self, s: Session, run_id: int, entries: Sequence[tuple[Source, str, str, str]],
                       now: dt.datetime) -> None:
        from batchcxr.store.repo import clean_text

        rows = {}
        for source, status, stage, reason in entries:
            key = path_hash(str(source.path))
            rows[key] = dict(path_hash=key, path=clean_text(str(source.path)), device=source.device,
                             inode=source.inode, size=source.size, mtime_ns=source.mtime_ns,
                             content_sha256=source.sha256, status=status, stage=stage,
                             reason=clean_text(reason), run_id=run_id, moved_to="", updated_at=now)
        self._upsert(s, SourceFile, [rows[k] for k in sorted(rows)], ["path_hash"],  # key order: no deadlocks
                     ["path", "device", "inode", "size", "mtime_ns", "content_sha256", "status", "stage", "reason",
                      "run_id", "moved_to", "updated_at"])

    def known_paths(self, entries: Iterable[tuple[str, FileIdentity]]) -> dict[str, KnownFile]:
        """Paths whose recorded identity (device, inode, size, mtime) is the one they have now:
        their outcome is known without reading them."""
        wanted = {path_hash(p): (p, ident) for p, ident in entries}
        found: dict[str, KnownFile] = {}
        keys = list(wanted)
        with self.read_session() as s:
            for i in range(0, len(keys), 500):
                for row in s.scalars(select(SourceFile).where(SourceFile.path_hash.in_(keys[i : i + 500]))):
                    path, ident = wanted[row.path_hash]
                    if (row.device, row.inode, row.size, row.mtime_ns) == (
                            ident.device, ident.inode, ident.size, ident.mtime_ns) and row.status != "removed":
                        found[path] = KnownFile(row.status, row.reason, row.content_sha256, row.stage)
        return found

    def record_moves(self, moves: Sequence[tuple[str, str]]) -> None:
        """Files the watcher moved (old path, new path): their records follow them."""
        if not moves:
            return
        with self.session() as s, s.begin():
            for old, new in moves:
                row = s.scalars(select(SourceFile).where(SourceFile.path_hash == path_hash(old))).first()
                if row is None:
                    continue
                s.execute(delete(SourceFile).where(SourceFile.path_hash == path_hash(new)))
                row.path_hash, row.path, row.moved_to = path_hash(new), new, new

    def failed_files(self, offset: int = 0, limit: int = 100) -> list[FailedFile]:
        """Files whose last outcome is ``failed``, newest first (until rescored or removed)."""
        with self.read_session() as s:
            rows = s.scalars(select(SourceFile).where(SourceFile.status == "failed")
                             .order_by(SourceFile.updated_at.desc(), SourceFile.id.desc())
                             .offset(offset).limit(limit)).all()
        return [FailedFile(r.id, r.path, r.status, r.stage, r.reason, r.run_id, r.updated_at, r.moved_to)
                for r in rows]

    def count_failed_files(self) -> int:
        with self.read_session() as s:
            return s.scalar(select(func.count()).select_from(SourceFile).where(SourceFile.status == "failed")) or 0

    def failed_paths(self, under: str | None = None) -> list[str]:
        """Paths of failed files (for ``score --retry-failed``), optionally under a folder."""
        with self.read_session() as s:
            q = select(SourceFile.path).where(SourceFile.status == "failed").order_by(SourceFile.id)
            if under:
                q = q.where(SourceFile.path.startswith(under.rstrip("/") + "/") | (SourceFile.path == under))
            return list(s.scalars(q).all())

    def mark_removed(self, paths: Iterable[str]) -> int:
        """Failed files that are gone: they leave the failure lists."""
        keys = [path_hash(p) for p in paths]
        if not keys:
            return 0
        with self.session() as s, s.begin():
            return s.execute(update(SourceFile).where(SourceFile.path_hash.in_(keys), SourceFile.status == "failed")
                             .values(status="removed", updated_at=utcnow())).rowcount

    # claims ----------------------------------------------------------------
    def claim(self, paths: Sequence[str], owner: str, ttl_s: float = 600.0) -> set[str]:
        """Claim paths for ``owner``; return the ones it now holds (new, its own, or expired
        claims of others). Others are being handled by another process: leave them alone."""
        if not paths:
            return set()
        now = utcnow()
        expires = now + dt.timedelta(seconds=ttl_s)
        keys = {path_hash(p): p for p in paths}
        with self.session() as s, s.begin():
            stmt = self._insert(Claim).on_conflict_do_nothing(index_elements=["path_hash"])
            s.execute(stmt, [dict(path_hash=k, path=p, owner=owner, claimed_at=now, expires_at=expires)
                             for k, p in keys.items()])
            s.execute(update(Claim).where(Claim.path_hash.in_(list(keys)),
                                          or_(Claim.owner == owner, Claim.expires_at < now))
                      .values(owner=owner, claimed_at=now, expires_at=expires))
            held = s.scalars(select(Claim.path_hash).where(Claim.path_hash.in_(list(keys)), Claim.owner == owner)).all()
        return {keys[k] for k in held}

    def claim_owners(self, paths: Sequence[str]) -> dict[str, str]:
        if not paths:
            return {}
        keys = {path_hash(p): p for p in paths}
        with self.read_session() as s:
            return {keys[k]: o for k, o in s.execute(select(Claim.path_hash, Claim.owner)
                                                     .where(Claim.path_hash.in_(list(keys))))}

    def release(self, paths: Iterable[str], owner: str) -> None:
        keys = [path_hash(p) for p in paths]
        if not keys:
            return
        with self.session() as s, s.begin():
            for i in range(0, len(keys), 500):
                s.execute(delete(Claim).where(Claim.path_hash.in_(keys[i : i + 500]), Claim.owner == owner))

    def release_all(self, owner: str) -> None:
        with Session(self.quick, expire_on_commit=False) as s, s.begin():
            s.execute(delete(Claim).where(Claim.owner == owner))

    def release_dead_claims(self, host: str, alive) -> list[str]:
        """Drop claims of processes on ``host`` that are gone (owner ``host:pid``): a restarted
        watcher must not wait for its own previous life's claims to expire. Returns their paths."""
        with self.session() as s, s.begin():
            owners = s.scalars(select(Claim.owner).where(Claim.owner.startswith(f"{host}:")).distinct()).all()
            dead = [o for o in owners if o.rsplit(":", 1)[-1].isdigit() and not alive(int(o.rsplit(":", 1)[-1]))]
            if not dead:
                return []
            paths = list(s.scalars(select(Claim.path).where(Claim.owner.in_(dead))))
            s.execute(delete(Claim).where(Claim.owner.in_(dead)))
            return paths

    def renew_claims(self, owner: str, ttl_s: float = 600.0) -> None:
        with Session(self.quick, expire_on_commit=False) as s, s.begin():
            s.execute(update(Claim).where(Claim.owner == owner)
                      .values(expires_at=utcnow() + dt.timedelta(seconds=ttl_s)))

    # incomplete-file timers ----------------------------------------------------
    def incomplete_since(self, path: str, size: int, mtime_ns: int) -> dt.datetime:
        """Since when ``path`` has been incomplete with this size and mtime (recorded now if it
        is new or changed): the quarantine timer, kept across restarts."""
        key = path_hash(path)
        with self.session() as s, s.begin():
            row = s.get(IncompleteFile, key)
            if row is None or (row.size, row.mtime_ns) != (size, mtime_ns):
                row = row or IncompleteFile(path_hash=key, path=path)
                row.size, row.mtime_ns, row.unchanged_since = size, mtime_ns, utcnow()
                s.add(row)
            return row.unchanged_since

    def forget_incomplete(self, paths: Iterable[str]) -> None:
        keys = [path_hash(p) for p in paths]
        if not keys:
            return
        with self.session() as s, s.begin():
            s.execute(delete(IncompleteFile).where(IncompleteFile.path_hash.in_(keys)))
