//! The engine's I/O paths: reads (from the preferred member, within the export), writes,
//! trims and write-zeroes fanned out to every member under range locks, flushes, and the
//! failures that remove a member before anything it missed is acknowledged.

use super::*;

/// The largest write of zeroes sent to members at once for a `NO_HOLE` write-zeroes.
pub(super) const ZERO_CHUNK: u32 = 1 << 20;

pub(super) type IoFuture<T> = Pin<Box<dyn Future<Output = Result<T, ReplicaIoError>> + Send>>;

/// Polls every future to completion, concurrently, in the calling task.
pub(super) async fn join_all<T>(mut futures: Vec<IoFuture<T>>) -> Vec<Result<T, ReplicaIoError>> {
    let mut results: Vec<Option<Result<T, ReplicaIoError>>> =
        futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, slot) in futures.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

impl Engine {
    /// Reads `len` bytes at `offset`, from a local member when there is one.
    /// Beyond the volume's end, up to the export's, the bytes read as zeroes.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, EngineError> {
        let result = self.read_within_export(offset, len).await;
        self.count(&result, |c| {
            bump(&c.reads, 1);
            bump(&c.read_bytes, u64::from(len));
        });
        result
    }

    /// Writes `data` at `offset` on every member (FUA on each with `fua`).
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        self.check_range(offset, data.len() as u64)?;
        let lock = self.lock_range(offset, data.len() as u64);
        self.write_locked(lock, offset, data, fua).await
    }

    /// Makes every acknowledged write durable on every member.
    pub async fn flush(&self) -> Result<(), EngineError> {
        let result = self
            .fan_out("flush", |m| Box::pin(async move { m.flush().await }))
            .await;
        self.count(&result, |c| bump(&c.flushes, 1));
        result
    }

    /// Discards `len` bytes at `offset` on every member (they read back as zeroes).
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), EngineError> {
        self.check_range(offset, u64::from(len))?;
        let lock = self.lock_range(offset, u64::from(len));
        self.trim_locked(lock, offset, len, fua).await
    }

    /// Makes `len` bytes at `offset` read as zeroes on every member: by trimming, or with
    /// `no_hole` by writing zeroes (the range stays allocated).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), EngineError> {
        self.check_range(offset, u64::from(len))?;
        let lock = self.lock_range(offset, u64::from(len));
        self.write_zeroes_locked(lock, offset, len, no_hole, fua)
            .await
    }

    /// Queues a range lock; taken synchronously so that the NBD reader orders overlapping
    /// requests as they arrived on the wire.
    pub(crate) fn lock_range(&self, offset: u64, len: u64) -> RangeLock {
        self.inner.range_locks.enqueue(offset, len)
    }

    pub(crate) async fn write_locked(
        &self,
        lock: RangeLock,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), EngineError> {
        lock.wait().await;
        let len = data.len() as u64;
        let result = self
            .fan_out("write", move |m| {
                let data = data.clone();
                Box::pin(async move { m.write(offset, data, fua).await })
            })
            .await;
        drop(lock);
        self.count(&result, |c| {
            bump(&c.writes, 1);
            bump(&c.written_bytes, len);
        });
        result
    }

    pub(crate) async fn trim_locked(
        &self,
        lock: RangeLock,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<(), EngineError> {
        lock.wait().await;
        let result = self.trim_members(offset, len, fua).await;
        drop(lock);
        self.count(&result, |c| bump(&c.trims, 1));
        result
    }

    pub(crate) async fn write_zeroes_locked(
        &self,
        lock: RangeLock,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), EngineError> {
        lock.wait().await;
        let result = if no_hole {
            self.write_zero_chunks(offset, len, fua).await
        } else {
            // A member's trim reads back as zeroes (the ReplicaIo contract).
            self.trim_members(offset, len, fua).await
        };
        drop(lock);
        self.count(&result, |c| bump(&c.write_zeroes, 1));
        result
    }

    pub(super) async fn trim_members(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<(), EngineError> {
        self.fan_out("trim", move |m| {
            Box::pin(async move { m.trim(offset, len).await })
        })
        .await?;
        if fua {
            self.fan_out("flush", |m| Box::pin(async move { m.flush().await }))
                .await?;
        }
        Ok(())
    }

    pub(super) async fn write_zero_chunks(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<(), EngineError> {
        let zeroes = Bytes::from(vec![0u8; ZERO_CHUNK.min(len) as usize]);
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            let chunk = zeroes.slice(..n as usize);
            let at = offset.saturating_add(u64::from(done));
            self.fan_out("write zeroes", move |m| {
                let chunk = chunk.clone();
                Box::pin(async move { m.write(at, chunk, fua).await })
            })
            .await?;
            done += n;
        }
        Ok(())
    }

    pub(super) async fn read_within_export(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, EngineError> {
        let size = self.size();
        let end = offset.checked_add(u64::from(len));
        if len == 0 || end.is_none_or(|end| end <= size || end > self.inner.exported) {
            return self.read_inner(offset, len).await;
        }
        // Past the end: what a grown volume holds there (members grow with zeroes).
        self.check_serving()?;
        let mut data = BytesMut::zeroed(len as usize);
        let inside = size.saturating_sub(offset);
        if inside > 0 {
            // Less than `len`, so it fits.
            let head = self.read_inner(offset, inside as u32).await?;
            data[..head.len()].copy_from_slice(&head);
        }
        Ok(data.freeze())
    }

    pub(super) async fn read_inner(&self, offset: u64, len: u32) -> Result<Bytes, EngineError> {
        self.check_serving()?;
        self.check_range(offset, u64::from(len))?;
        let members = self.snapshot();
        let mut failed: Vec<(Member, ReplicaIoError)> = Vec::new();
        for member in self.read_order(&members) {
            let error = match member.read(offset, len).await {
                Ok(data) if data.len() == len as usize => {
                    if !failed.is_empty() {
                        if let Err(e) = self.remove_failed("read", failed).await {
                            warn!(volume = %self.inner.volume_id, error = %e,
                                "a member failed a read and stays a member");
                        }
                    }
                    // A fenced or expired engine returns no data: it may be stale.
                    self.check_serving()?;
                    return Ok(data);
                }
                Ok(data) => ReplicaIoError::Io {
                    replica: member.id().to_string(),
                    why: format!("returned {} bytes for a read of {len}", data.len()),
                },
                Err(e @ ReplicaIoError::Fenced { .. }) => return Err(self.fenced(&e)),
                Err(e) => e,
            };
            warn!(volume = %self.inner.volume_id, replica = member.id(), %error,
                "read failed on a member; trying another");
            failed.push((Arc::clone(member), error));
        }
        Err(self.unavailable("read", &failed))
    }

    /// Local members first, then the others starting from a rotating position.
    pub(super) fn read_order<'a>(&self, members: &'a [Member]) -> Vec<&'a Member> {
        let mut order: Vec<&Member> = members.iter().filter(|m| m.is_local()).collect();
        let remote: Vec<&Member> = members.iter().filter(|m| !m.is_local()).collect();
        if !remote.is_empty() {
            let turn = self.inner.read_turn.fetch_add(1, Ordering::Relaxed) % remote.len();
            order.extend(remote[turn..].iter().chain(&remote[..turn]));
        }
        order
    }

    /// Runs `op` on every current member in parallel. Succeeds when every member that is
    /// still a member has done it: members that failed are removed first.
    pub(super) async fn fan_out(
        &self,
        what: &'static str,
        op: impl Fn(Member) -> IoFuture<()>,
    ) -> Result<(), EngineError> {
        self.check_serving()?;
        let members = self.snapshot();
        // Rebuilding replicas get every mutation too; what they fail stops their rebuild
        // only.
        let targets: Vec<Arc<rebuild::Target>> = self
            .targets()
            .iter()
            .filter(|t| !t.is_failed())
            .cloned()
            .collect();
        let futures = members
            .iter()
            .cloned()
            .chain(targets.iter().map(|t| Arc::clone(&t.member)))
            .map(&op)
            .collect();
        let mut results = join_all(futures).await;
        let target_results = results.split_off(members.len());
        for (target, result) in targets.iter().zip(target_results) {
            match result {
                Ok(()) => {}
                Err(e @ ReplicaIoError::Fenced { .. }) => return Err(self.fenced(&e)),
                Err(e) => self.target_failed(target, what, &e),
            }
        }
        let mut failed = Vec::new();
        for (member, result) in members.iter().zip(results) {
            match result {
                Ok(()) => {}
                Err(e @ ReplicaIoError::Fenced { .. }) => return Err(self.fenced(&e)),
                Err(e) => failed.push((Arc::clone(member), e)),
            }
        }
        if !failed.is_empty() {
            if let Err(e) = self.remove_failed(what, failed).await {
                // Members that failed it stay members, and may or may not have done it.
                self.inner.unclean.store(true, Ordering::Release);
                return Err(e);
            }
        }
        // Acknowledge only while still serving.
        self.check_serving()
    }
}
