#include "route.h"

#include <netinet/in.h>
#include <string.h>

#include <linux/netfilter_ipv4.h>

/* <linux/netfilter_ipv6/ip6_tables.h> drags in half of netfilter for one
 * number. */
#ifndef IP6T_SO_ORIGINAL_DST
#define IP6T_SO_ORIGINAL_DST 80
#endif

/* An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d: made plain
 * AF_INET, the form conntrack and routes speak. */
static void unmap(struct sockaddr_storage *a) {
  if (a->ss_family != AF_INET6) return;
  struct sockaddr_in6 s6 = *(struct sockaddr_in6 *)a;
  if (!IN6_IS_ADDR_V4MAPPED(&s6.sin6_addr)) return;
  struct sockaddr_in s4;
  memset(&s4, 0, sizeof(s4));
  s4.sin_family = AF_INET;
  s4.sin_port = s6.sin6_port;
  memcpy(&s4.sin_addr, &s6.sin6_addr.s6_addr[12], 4);
  memset(a, 0, sizeof(*a));
  memcpy(a, &s4, sizeof(s4));
}

int pc_route_original_dst(uv_tcp_t *tcp, struct sockaddr_storage *dst) {
  uv_os_fd_t fd;
  if (uv_fileno((uv_handle_t *)tcp, &fd) != 0) return -1;
  struct sockaddr_storage local;
  socklen_t len = sizeof(local);
  if (getsockname(fd, (struct sockaddr *)&local, &len) != 0) return -1;
  unmap(&local);
  memset(dst, 0, sizeof(*dst));
  /* The conntrack entry has the connection's real family: an IPv4
   * connection accepted on an AF_INET6 socket is asked with SOL_IP. */
  if (local.ss_family == AF_INET6) {
    len = sizeof(struct sockaddr_in6);
    if (getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, dst, &len) != 0) return -1;
    dst->ss_family = AF_INET6;
  } else {
    len = sizeof(struct sockaddr_in);
    if (getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, dst, &len) != 0) return -1;
    dst->ss_family = AF_INET;
  }
  return pc_endpoint_same_addr(&local, dst) ? 1 : 0;
}

static int in_prefix(const pc_route_t *r, const struct sockaddr_storage *dst) {
  if (r->family != dst->ss_family) return 0;
  const uint8_t *a = dst->ss_family == AF_INET6
                         ? ((const struct sockaddr_in6 *)dst)->sin6_addr.s6_addr
                         : (const uint8_t *)&((const struct sockaddr_in *)dst)->sin_addr;
  int bits = r->bits;
  for (int i = 0; bits > 0; i++, bits -= 8) {
    uint8_t mask = bits >= 8 ? 0xff : (uint8_t)(0xff << (8 - bits));
    if ((a[i] & mask) != r->net[i]) return 0;
  }
  return 1;
}

const pc_listener_cfg_t *pc_route_match(const pc_listener_cfg_t *l,
                                        const struct sockaddr_storage *dst, pc_endpoint_t **ep) {
  *ep = NULL;
  for (size_t i = 0; i < l->nroutes; i++) {
    const pc_route_t *r = &l->routes[i];
    if (r->family) {
      if (!in_prefix(r, dst) || (r->port && r->port != pc_addr_port(dst))) continue;
      *ep = pc_target_endpoint_for(r->lc.tgt, dst);
    } else {
      /* A name matches the addresses it resolves to now, on its port. */
      *ep = pc_target_endpoint_for(r->lc.tgt, dst);
      if (!*ep) continue;
    }
    return &r->lc;
  }
  return NULL;
}

pc_endpoint_t *pc_route_local(const pc_listener_cfg_t *l, const struct sockaddr_storage *dst) {
  struct sockaddr_storage a;
  memset(&a, 0, sizeof(a));
  struct sockaddr_in *s = (struct sockaddr_in *)&a;
  s->sin_family = AF_INET;
  s->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  s->sin_port = htons(pc_addr_port(dst));
  return pc_target_endpoint_for(l->tgt, &a);
}
