/* cffi cdef text for libxenvchan (Xen 4.x), read by qvaudio/vchan.py.
 *
 * Not a C header to compile against: it is the subset of
 * /usr/include/libxenvchan.h that cffi's parser accepts, with the handle types
 * from xengnttab.h / xenevtchn.h / xentoollog.h reduced to opaque structs.
 *
 * struct libxenvchan is declared in full, not opaquely, because its `blocking`
 * bitfield must be written by the caller: neither init function sets it, so it
 * starts as whatever malloc returned. The ring `order` fields give the ring
 * capacities. tests/test_vchan.py compares this layout with gcc's view of the
 * real header.
 */

struct xentoollog_logger;
typedef struct xengntdev_handle xengnttab_handle;
typedef struct xengntshr_handle xengntshr_handle;
typedef struct xenevtchn_handle xenevtchn_handle;
struct ring_shared;
struct vchan_interface;

struct libxenvchan_ring {
    struct ring_shared *shr;
    void *buffer;
    int order;              /* capacity is 1 << order bytes */
};

struct libxenvchan {
    union {
        xengntshr_handle *gntshr;   /* server */
        xengnttab_handle *gnttab;   /* client */
    };
    struct vchan_interface *ring;
    xenevtchn_handle *event;
    uint32_t event_port;
    int is_server:1;
    int server_persist:1;
    int blocking:1;
    struct libxenvchan_ring read, write;
    char *xs_path;          /* server only; freed and removed from XenStore by close */
};

struct libxenvchan *libxenvchan_server_init(struct xentoollog_logger *logger, int domain,
                                            const char *xs_path, size_t read_min,
                                            size_t write_min);
struct libxenvchan *libxenvchan_client_init(struct xentoollog_logger *logger, int domain,
                                            const char *xs_path);
void libxenvchan_close(struct libxenvchan *ctrl);
int libxenvchan_recv(struct libxenvchan *ctrl, void *data, size_t size);
int libxenvchan_read(struct libxenvchan *ctrl, void *data, size_t size);
int libxenvchan_send(struct libxenvchan *ctrl, const void *data, size_t size);
int libxenvchan_write(struct libxenvchan *ctrl, const void *data, size_t size);
int libxenvchan_wait(struct libxenvchan *ctrl);
int libxenvchan_fd_for_select(struct libxenvchan *ctrl);
int libxenvchan_is_open(struct libxenvchan *ctrl);
int libxenvchan_data_ready(struct libxenvchan *ctrl);
int libxenvchan_buffer_space(struct libxenvchan *ctrl);
