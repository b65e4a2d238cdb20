//! Packs on S3 (the layout and its checks: `tally_es::packs`):
//! `packs/{seq:020}-{sha256}.json`, the newest the one with the highest `seq`. A packer
//! creates the next `seq` only if no one has (`If-None-Match: *`), then deletes the packs
//! before the one it followed (a reader that listed an older pack and finds it gone reads
//! the streams instead). A reader lists `packs/` (a few keys), GETs the newest and checks
//! it against the digest in its name.

use crate::S3EventStore;
use async_trait::async_trait;
use std::collections::BTreeSet;
use tally_es::packs::{Pack, Packs};
use tally_es::segments::SegmentHead;
use tally_es::{StoreError, StoredCommit, StreamId};

/// How many of the newest packs a reader tries before it reads the streams instead.
const TRIED: usize = 2;

impl S3EventStore {
    fn packs_prefix(&self) -> String {
        format!("{}packs/", self.prefix)
    }

    /// The packs, newest first: (key, seq, digest).
    async fn packs(&self) -> Result<Vec<(String, u64, String)>, StoreError> {
        let prefix = self.packs_prefix();
        let mut packs: Vec<(String, u64, String)> = self
            .list(&prefix, None)
            .await?
            .into_iter()
            .filter_map(|(key, _)| {
                let name = key.strip_prefix(&prefix)?.strip_suffix(".json")?;
                let (seq, digest) = name.split_once('-')?;
                Some((key.clone(), seq.parse().ok()?, digest.to_owned()))
            })
            .collect();
        packs.sort_by_key(|p| std::cmp::Reverse(p.1));
        Ok(packs)
    }
}

#[async_trait]
impl Packs for S3EventStore {
    async fn latest_pack(&self) -> Result<Option<Pack>, StoreError> {
        for (key, _, digest) in self.packs().await?.into_iter().take(TRIED) {
            let Some(bytes) = self.get_bytes_if_any(&key).await? else {
                // Deleted by a packer since the listing: a newer one is there.
                tracing::debug!(key, "a pack went between the listing and the GET");
                continue;
            };
            match Pack::parse(&bytes, &digest) {
                Ok(pack) => return Ok(Some(pack)),
                Err(why) => tracing::warn!(key, why, "a pack does not verify: passed over"),
            }
        }
        Ok(None)
    }

    async fn put_pack(&self, pack: &Pack) -> Result<(), StoreError> {
        let packs = self.packs().await?;
        let seq = packs.first().map_or(1, |p| p.1 + 1);
        let (bytes, digest) = pack.to_bytes();
        let key = format!("{}{seq:020}-{digest}.json", self.packs_prefix());
        if !self.create(&key, bytes, "application/json").await? {
            // Another packer's pack took this place: it is as good as this one.
            tracing::debug!(key, "another packer wrote this pack's place first");
            return Ok(());
        }
        // Keep the one before (a reader may be reading it); the older ones go.
        for (old, _, _) in packs.iter().skip(1) {
            self.delete(old).await?;
        }
        Ok(())
    }

    async fn unpublished_streams(&self) -> Result<BTreeSet<StreamId>, StoreError> {
        S3EventStore::unpublished_streams(self).await
    }

    async fn pack_head(&self, stream: &StreamId) -> Result<SegmentHead, StoreError> {
        let mut head = self
            .head(stream)
            .await?
            .unwrap_or_else(|| SegmentHead::empty(stream));
        let after = self.read_commits_after(stream, head.covered()).await?;
        head.commits.extend(after);
        head.check().map_err(StoreError::Corrupt)?;
        Ok(head)
    }

    async fn unpack(&self, head: &SegmentHead) -> Result<Option<Vec<StoredCommit>>, StoreError> {
        let Some(mut commits) = self.sealed_runs(&head.stream, head.sealed.clone()).await? else {
            return Ok(None);
        };
        commits.extend(head.commits.iter().cloned());
        Ok(Some(commits))
    }
}
