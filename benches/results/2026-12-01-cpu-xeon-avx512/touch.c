#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <time.h>
#include <sys/mman.h>
int main(int c, char**v){ size_t n=(size_t)atol(v[1])<<20; int huge=atoi(v[2]); struct timespec a,b; clock_gettime(CLOCK_MONOTONIC,&a);
 char*p=mmap(0,n,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); if(huge==1) madvise(p,n,MADV_HUGEPAGE); if(huge==2) madvise(p,n,23 /*MADV_POPULATE_WRITE*/);
 memset(p,1,n); clock_gettime(CLOCK_MONOTONIC,&b); printf("huge=%d touched %zu MB in %.2f s\n", huge, n>>20, (b.tv_sec-a.tv_sec)+(b.tv_nsec-a.tv_nsec)*1e-9); return p[n/2]==3; }
