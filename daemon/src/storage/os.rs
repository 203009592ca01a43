#[derive(Debug)]
pub struct OsStorage;
impl OsStorage {
    pub fn open(
        _r: &std::path::Path,
        _c: super::probe::BackendChoice,
        _p: crate::buffer_pool::BufferPool,
    ) -> Result<Box<dyn super::Storage>, super::StorageError> {
        todo!()
    }
}
