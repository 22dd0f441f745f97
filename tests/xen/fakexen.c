/* LD_PRELOAD shim that lets Debian's cxenstored 4.17 run on a plain Linux host (no Xen):
 * fakes libxenctrl/libxengnttab/libxenevtchn entry points and /proc/xen/xsd_{port,kva}.
 * From /work/shared/xen-testbed, changed for qvaudio's tests so guests can be simulated:
 * every domid "exists", and mapping a guest's xenstore ring gives a private zeroed page
 * instead of ENOSYS, so XS_INTRODUCE succeeds and xenstored fires the real
 * @introduceDomain / @releaseDomain watches. The fake rings stay empty and the fake event
 * channels never fire, so introduced domains stay idle and are never reaped. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <fcntl.h>
#include <unistd.h>
#include <errno.h>
#include <dlfcn.h>
#include <stdint.h>
#include <sys/mman.h>
#include <xenctrl.h>
static int evpipe[2]={-1,-1}; static int nextport=10;
xc_interface *xc_interface_open(xentoollog_logger *l, xentoollog_logger *d, unsigned f){ return (xc_interface*)calloc(1,64); }
int xc_interface_close(xc_interface *x){ return 0; }
int xc_domain_getinfo(xc_interface *x, uint32_t first, unsigned int max, xc_dominfo_t *info){
  /* Every domid exists, so the toolstack can hand nodes to a guest before introducing it. */
  if(max<1||first>=0x7FF0) return 0; memset(info,0,sizeof *info); info->domid=first; info->running=1; return 1; }
void *xengnttab_open(void *l, unsigned f){ return calloc(1,64); }
int xengnttab_close(void *h){ return 0; }
int xengnttab_set_max_grants(void *h, uint32_t n){ return 0; }
void *xengnttab_map_grant_ref(void *h, uint32_t d, uint32_t r, int p){
  void *a=mmap(NULL,4096,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); return a==MAP_FAILED?NULL:a; }
int xengnttab_unmap(void *h, void *a, uint32_t c){ return munmap(a,4096ul*c); }
void *xenevtchn_open(void *l, unsigned f){ if(evpipe[0]<0 && pipe(evpipe)) return NULL; return calloc(1,64); }
void *xenevtchn_fdopen(void *l, int fd, unsigned f){ return xenevtchn_open(l,f); }
int xenevtchn_fd(void *h){ return evpipe[0]; }
int xenevtchn_bind_virq(void *h, unsigned v){ return nextport++; }
int xenevtchn_bind_interdomain(void *h, uint32_t d, uint32_t p){ return nextport++; }
int xenevtchn_notify(void *h, uint32_t p){ return 0; }
int xenevtchn_pending(void *h){ errno=EAGAIN; return -1; }
int xenevtchn_unmask(void *h, uint32_t p){ return 0; }
int xenevtchn_unbind(void *h, uint32_t p){ return 0; }
static const char *redirect(const char *p){
  const char *dir=getenv("FAKEXEN_DIR"); static char buf[4096];
  if(!dir) dir="/tmp/fakexen";
  if(!strcmp(p,"/proc/xen/xsd_port")){ snprintf(buf,sizeof buf,"%s/xsd_port",dir); return buf; }
  if(!strcmp(p,"/proc/xen/xsd_kva")){ snprintf(buf,sizeof buf,"%s/xsd_kva",dir); return buf; }
  return p; }
int open(const char *p, int fl, ...){ mode_t m=0; if(fl&O_CREAT){va_list a;va_start(a,fl);m=va_arg(a,int);va_end(a);}
  static int (*real)(const char*,int,...); if(!real) real=dlsym(RTLD_NEXT,"open"); return real(redirect(p),fl,m); }
int open64(const char *p, int fl, ...){ mode_t m=0; if(fl&O_CREAT){va_list a;va_start(a,fl);m=va_arg(a,int);va_end(a);}
  static int (*real)(const char*,int,...); if(!real) real=dlsym(RTLD_NEXT,"open64"); return real(redirect(p),fl,m); }
FILE *fopen(const char *p, const char *m){ static FILE*(*real)(const char*,const char*); if(!real) real=dlsym(RTLD_NEXT,"fopen"); return real(redirect(p),m); }
